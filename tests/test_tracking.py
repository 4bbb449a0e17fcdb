"""Tracking: the curves of a run on one step axis (the round), TensorBoard or MLflow, and `fedbrats plot-run`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedbrats.cli import main as cli_main
from fedbrats.evaluation.curves import run_curves
from fedbrats.federated.tracking import global_scalars, site_scalars
from fedbrats.jobgen import job_spec
from fedbrats.recipe import TRACKING_EVENTS, job_files

TINY = {"epochs_per_round": 1, "data": {"roi_size": [16, 16, 16], "batch_size": 1, "cache_rate": 1.0}}

#: Two rounds and the final validation of a FedKD-like run: the second site validates every other round only.
HISTORY = [
    {
        "round": 0,
        "sites": {
            "site-1": {
                "metrics": {"val_mean_dice": 0.2, "val_dice_WT": 0.3},
                "train_loss": 1.5,
                "loss_terms": {"drl": 0.4, "rcl": 0.1},
            },
            "site-2": {"metrics": {}, "train_loss": 1.7, "loss_terms": {"drl": 0.5, "rcl": float("nan")}},
        },
        "aggregated": {"val_mean_dice": 0.2, "val_dice_WT": 0.3, "val_hd95_WT": 20.0},
    },
    {
        "round": 1,
        "sites": {
            "site-1": {"metrics": {"val_mean_dice": 0.4}, "train_loss": 1.1, "loss_terms": {"drl": 0.3, "rcl": 0.1}},
            "site-2": {"metrics": {"val_mean_dice": 0.35}, "train_loss": 1.2, "loss_terms": {"drl": 0.2}},
        },
        "aggregated": {"val_mean_dice": 0.38},
    },
    {
        "round": 2,
        "final_validation": True,
        "sites": {"site-1": {"metrics": {"val_mean_dice": 0.5}}, "site-2": {"metrics": {"val_mean_dice": 0.45}}},
        "aggregated": {"val_mean_dice": 0.48},
    },
]


def test_a_round_summary_becomes_curves_with_one_name_each() -> None:
    entry = {**HISTORY[0]["sites"]["site-2"], "lr": 3e-3}
    assert site_scalars(entry) == {"train_loss": 1.7, "loss_drl": 0.5, "lr": 3e-3}, "NaN dropped, terms prefixed"
    assert site_scalars({"metrics": {"val_mean_dice": 0.5}}) == {"val_mean_dice": 0.5}
    assert global_scalars(HISTORY[0]) == {"val_mean_dice": 0.2, "val_dice_WT": 0.3, "val_hd95_WT": 20.0}


def test_run_curves_step_every_family_by_round() -> None:
    panels = run_curves(HISTORY)
    assert panels["global model (site-weighted validation)"]["val_mean_dice"] == ([0, 1, 2], [0.2, 0.38, 0.48])
    assert panels["val_mean_dice per site"]["site-2"] == ([1, 2], [0.35, 0.45]), "rounds without validation skipped"
    assert panels["train_loss per site"]["site-1"] == ([0, 1], [1.5, 1.1]), "no training loss in the final validation"
    assert panels["loss_drl per site"]["site-2"] == ([0, 1], [0.5, 0.2])
    assert "site-2" not in panels["loss_rcl per site"], "a NaN term is no point of a curve"


def test_plot_run_writes_a_png(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(HISTORY).replace("NaN", "null"))
    out = tmp_path / "plots" / "curves.png"
    assert cli_main(["plot-run", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(str(out)).shape[:2]
    assert width == 1500 and height == 720, "3 columns x 2 rows: global, per-site Dice, loss, drl, rcl"
    assert cli_main(["plot-run", str(tmp_path / "missing")]) == 1, "a folder without metrics.json is an error"


def test_tracking_is_one_option_and_checked() -> None:
    tb = json.loads(job_files("fedavg")["app/config/config_fed_server.json"])
    (receiver,) = [c for c in tb["components"] if c["id"] == "tb_receiver"]
    assert receiver["args"]["events"] == TRACKING_EVENTS, "sites' forwarded records and the server's own"
    with pytest.raises(ValueError, match="tracking must be one of"):
        job_spec("fedavg", tracking="wandb")
    with pytest.raises(ValueError, match="tracking='mlflow'"):
        job_spec("fedavg", tracking_uri="http://mlflow:5000")


def test_mlflow_tracking_is_an_optional_extra() -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    server = json.loads(job_files("fedkd", tracking="mlflow")["app/config/config_fed_server.json"])
    (receiver,) = [c for c in server["components"] if c["id"] == "mlflow_receiver"]
    assert receiver["path"] == "fedbrats.federated.server.mlflow_receiver.FedBratsMLflowReceiver"
    assert receiver["args"]["kw_args"]["experiment_name"] == "fedbrats"
    assert "tracking_uri" not in receiver["args"], "default: NVFlare's store in the job's result folder"
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "mlflow" not in " ".join(pyproject["project"]["dependencies"]), "mlflow must stay optional"
    assert any(d.startswith("mlflow") for d in pyproject["project"]["optional-dependencies"]["mlflow"])


def test_mlflow_without_its_package_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fedbrats.federated.server.mlflow_receiver", None)  # as if mlflow were absent
    with pytest.raises(ValueError, match=r"fedbrats\[mlflow\]"):
        job_files("fedavg", tracking="mlflow")


@pytest.mark.integration
def test_mlflow_receives_every_loss_term_and_the_global_model_per_round(
    tiny_federation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-round FedKD simulation streaming to a local MLflow file store: one run per site and one for the server,
    every curve stepped by the round."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    from fedbrats.simulate import simulate

    # A file store keeps the test fast (an SQLite store spends ~15 s creating its tables); MLflow 3 asks for this
    # opt-in to a file store. The simulator's processes inherit it.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    sites = ["site-1", "site-2"]
    result = simulate(
        "fedkd",
        str(tmp_path / "ws"),
        sites_file=tiny_federation,
        num_rounds=2,
        training=TINY,
        clients=sites,
        tracking="mlflow",
        tracking_uri=store,
    )
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("fedbrats")
    by_origin = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert len(by_origin) == 3, f"one run per site and one for the server: {sorted(by_origin)}"
    site_run = next(r for name, r in by_origin.items() if name.startswith("site-1-"))
    server_run = next(r for name, r in by_origin.items() if not name.startswith("site-"))
    assert all(r.info.status == "FINISHED" for r in by_origin.values())

    terms = set(result.history[0]["sites"]["site-1"]["loss_terms"])
    assert {"drl", "rcl"} <= terms, f"FedKD reports its loss terms: {terms}"
    for tag in ["train_loss", "lr", *(f"loss_{t}" for t in terms)]:
        steps = sorted(m.step for m in client.get_metric_history(site_run.info.run_id, tag))
        assert steps == [0, 1], f"{tag} at the site, by round: {steps}"
    recorded = result.history[1]["sites"]["site-1"]["train_loss"]
    (logged,) = [m.value for m in client.get_metric_history(site_run.info.run_id, "train_loss") if m.step == 1]
    assert logged == pytest.approx(recorded), "the tracked loss is the one metrics.json records"
    site_dice = sorted(m.step for m in client.get_metric_history(site_run.info.run_id, "val_mean_dice"))
    assert site_dice == [0, 1, 2], "the site's validation of each global model, the final one at step num_rounds"
    server_dice = client.get_metric_history(server_run.info.run_id, "val_mean_dice")
    assert sorted(m.step for m in server_dice) == [0, 1, 2]
    final = {m.step: m.value for m in server_dice}[2]
    assert final == pytest.approx(result.history[-1]["aggregated"]["val_mean_dice"]), "the server logs the aggregate"
