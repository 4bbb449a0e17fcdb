"""Simulator runs of the jobs on tiny data: FedAvg end to end and a failing site (FedKD under load: test_load.py)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from fedbrats.simulate import simulate

pytestmark = pytest.mark.integration

TINY = {
    "epochs_per_round": 2,
    "lr": 3e-3,
    "data": {"roi_size": [16, 16, 16], "batch_size": 1, "cache_rate": 1.0},
}


def _train_rounds(history: list[dict]) -> list[dict]:
    return [r for r in history if not r.get("final_validation")]


def _check_models(run_dir: str) -> None:
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        path = os.path.join(run_dir, "app_server", name)
        assert os.path.isfile(path), f"{name} was not saved"
        state = torch.load(path, weights_only=True)["model"]
        assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    with open(os.path.join(run_dir, "model_spec.json"), encoding="utf-8") as f:
        assert json.load(f)["path"].startswith("fedbrats.networks.")


def test_fedavg_two_rounds(tiny_federation: str, tmp_path) -> None:
    """FedAvg over 4 sites with missing sequences: models saved, finite decreasing loss, per-round metrics."""
    # min_test_cases 1: the tiny federation has one test case per site (a real job withholds such a score).
    training = {**TINY, "min_test_cases": 1}
    result = simulate("fedavg", str(tmp_path), sites_file=tiny_federation, num_rounds=2, training=training)
    _check_models(result.run_dir)
    rounds = _train_rounds(result.history)
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert sorted(r["sites"]) == ["site-1", "site-2", "site-3", "site-4"]
        assert not r["rejected"] and not r["left_out"]
        for site in r["sites"].values():
            assert math.isfinite(site["train_loss"])
            assert 0.0 <= site["metrics"]["val_mean_dice"] <= 1.0
            assert "val_hd95_WT" in site["metrics"]
    losses = [np.mean([s["train_loss"] for s in r["sites"].values()]) for r in rounds]
    assert losses[1] < losses[0], f"mean training loss did not decrease: {losses}"
    final = result.history[-1]
    assert final.get("final_validation") and len(final["sites"]) == 4
    assert os.path.isdir(os.path.join(result.run_dir, "tb_events", "site-1")), "TensorBoard events not streamed"
    tb_origins = set(os.listdir(os.path.join(result.run_dir, "tb_events")))
    assert tb_origins - {"site-1", "site-2", "site-3", "site-4"}, "no TensorBoard curves of the global model (server)"
    # The final validation scored the post-processing candidates and the server kept the best on validation.
    assert "val_mean_dice_min10" in final["sites"]["site-1"]["metrics"]
    with open(os.path.join(result.run_dir, "postprocessing.json"), encoding="utf-8") as f:
        choice = json.load(f)
    assert choice["min_component_voxels"] in (0, 10, 50, 200) and set(choice["scores"]) == {"0", "10", "50", "200"}
    _check_round_events(result.run_dir, str(tmp_path))
    _check_cross_site(result.run_dir, str(tmp_path))


def _check_cross_site(run_dir: str, workspace: str) -> None:
    """The job ended with the federated evaluation: NVFlare's cross_val_results.json (every site scored the final and
    the best global model on its own test case, with its own sequences; only site-1 has all four), the matrix, and
    nothing but aggregates in what the sites sent."""
    from fedbrats.federated.server.cross_site_report import read_cross_site_results
    from fedbrats.runs import RunFolder

    run = RunFolder(run_dir)
    results, errors = read_cross_site_results(run_dir)
    assert errors == {}
    sites = ["site-1", "site-2", "site-3", "site-4"]
    assert sorted(results) == sites
    for site in sites:
        assert sorted(results[site]) == ["FL_global_model.pt", "best_FL_global_model.pt"]
        for metrics in results[site].values():
            assert metrics["test_num_cases"] == 1 and 0.0 <= metrics["test_mean_dice"] <= 1.0
            assert ("test_all15_mean_dice" in metrics) == (site == "site-1")
            assert all(k.startswith("test_") for k in metrics)
    matrix = open(run.cross_site_matrix, encoding="utf-8").read()
    assert all(f"{site} (1 case)" in matrix for site in sites) and "global (best)" in matrix
    assert os.path.getsize(run.cross_site_heatmap) > 0
    # the summary went to the tracking receiver (TensorBoard here), under the server's name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    server_events = [d for d in os.listdir(run.tb_events) if d not in sites]
    tags = []
    for name in server_events:
        events = EventAccumulator(os.path.join(run.tb_events, name))
        events.Reload()
        tags += events.Tags()["scalars"]
    assert "cross_site/global_final/site_weighted_mean_dice" in tags, tags
    # the payload audit of each site: a cross-site result holds metrics only, every one a test_ aggregate
    for site in sites:
        audit = os.path.join(workspace, "sim", site, "simulate_job", "payload_audit.jsonl")
        lines = [json.loads(line) for line in open(audit, encoding="utf-8")]
        scored = [e for e in lines if "test_num_cases" in e["data"]]
        assert len(scored) == 2, lines[-3:]
        assert all(e["kind"] == "METRICS" and all(k.startswith("test_") for k in e["data"]) for e in scored)


def _check_round_events(run_dir: str, workspace: str) -> None:
    """The controller's round events of a 2-round, 4-site run, and the benchmarks' timeline read from them and from
    the sites' own events (``site_events.jsonl`` of each site's run folder)."""
    from benchmarks.simlog import read_round_timeline, site_events_files
    from fedbrats.federated.events import read_events

    events = read_events(os.path.join(run_dir, "round_events.jsonl"))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert [e["round"] for e in events if e["event"] == "round_start"] == [0, 1]
    for r in (0, 1):
        received = [e for e in events if e["event"] == "result_received" and e["round"] == r]
        assert sorted(e["site"] for e in received) == ["site-1", "site-2", "site-3", "site-4"]
        assert all(e["usable"] and e["task"] == "train" for e in received)
    assert sum(e["event"] == "result_received" and e["task"] == "validate" for e in events) == 4
    sites = ["site-1", "site-2", "site-3", "site-4"]
    timeline = read_round_timeline(os.path.join(run_dir, "round_events.jsonl"), site_events_files(workspace, sites))
    assert sorted(timeline.rounds) == [0, 1]
    for r in (0, 1):
        rt = timeline.rounds[r]
        assert rt.breakdown() is not None and sorted(rt.sites) == sites
        assert all(rt.sent <= start <= end <= rt.done for start, end in rt.sites.values()), "site work outside round"
        assert all(steps > 0 for steps in rt.site_steps.values())


def test_a_failing_site_does_not_stop_the_federation(tiny_federation, tmp_path) -> None:
    """site-4's data is unreadable: with min_clients=3 every round completes, and site-4 is named as left out."""
    sites = json.loads(open(tiny_federation, encoding="utf-8").read())
    broken = tmp_path / "broken-site-4.json"
    datalist = json.loads(open(sites["sites"]["site-4"]["datalist"], encoding="utf-8").read())
    for case in datalist["training"] + datalist["validation"]:
        case["image"] = [str(tmp_path / "missing_t1.nii.gz"), None, None, None]
    broken.write_text(json.dumps(datalist))
    sites["sites"]["site-4"]["datalist"] = str(broken)
    sites_file = tmp_path / "sites.json"
    sites_file.write_text(json.dumps(sites))

    result = simulate(
        "fedavg", str(tmp_path / "run"), sites_file=str(sites_file), num_rounds=2, training=TINY, min_clients=3
    )
    rounds = _train_rounds(result.history)
    assert len(rounds) == 2
    for r in rounds:
        assert sorted(r["sites"]) == ["site-1", "site-2", "site-3"]
        assert "site-4" in r["left_out"] or "site-4" in r["rejected"]
    log = open(os.path.join(str(tmp_path / "run"), "simulator.log"), encoding="utf-8").read()
    assert "missing_t1.nii.gz" in log, "the failing site's error must name the file"
    # the cross-site evaluation names the failed site per model; the other sites' results stand
    from fedbrats.federated.server.cross_site_report import read_cross_site_results

    results, errors = read_cross_site_results(result.run_dir)
    assert sorted(errors) == ["site-4"] and "missing_t1.nii.gz" in " ".join(errors["site-4"].values())
    assert sorted(results) == ["site-1", "site-2", "site-3"]
