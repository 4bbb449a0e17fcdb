"""The federated (cross-site) evaluation's parts: a site's test metrics, the server's checks of a result, the jobs
that end with it, and the models of an on-demand evaluation. The run in the simulator: tests/test_simulator_jobs.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel

from fedbrats.constants import REGIONS, combination_name, modality_combinations
from fedbrats.data.site_config import load_site_config
from fedbrats.federated.client.site_evaluation import score_received_model, site_test_cases, site_test_metrics
from fedbrats.federated.client.trainer import TrainConfig
from fedbrats.federated.protocol import TEST_NUM_CASES_KEY, cross_site_combination_key, cross_site_metric_key
from fedbrats.federated.server.cross_site import BEST_MODEL, FINAL_MODEL, FedBratsCrossSiteEval, result_problem
from fedbrats.networks import build_network, model_spec
from fedbrats.scoring.combinations import evaluate_combinations

DATA = {"roi_size": [16, 16, 16], "zoom": 1.0}


def _site(tiny_federation: str, name: str):
    return load_site_config(tiny_federation, name)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("segresnet", init_filters=8).eval()


def test_a_site_with_all_four_sequences_reports_its_own_and_the_15_combinations(tiny_federation: str) -> None:
    site = _site(tiny_federation, "site-1")
    metrics = site_test_metrics(_net(), site, TrainConfig.from_dict({"data": DATA}).data, min_cases=1)
    n = site_test_cases(site)
    assert n >= 1 and metrics[TEST_NUM_CASES_KEY] == n
    for region in REGIONS:
        assert 0.0 <= metrics[f"test_dice_{region}"] <= 1.0 and metrics[f"test_hd95_{region}"] >= 0.0
        assert cross_site_metric_key("dice", region, all15=True) in metrics
    combos = [combination_name(c) for c in modality_combinations()]
    assert all(cross_site_combination_key(c) in metrics for c in combos)
    # own sequences = all four: the same as the all-four combination
    assert metrics["test_mean_dice"] == pytest.approx(metrics[cross_site_combination_key("t1+t1ce+t2+flair")])
    # aggregates only: one number per key, nothing per case or named by case
    assert all(isinstance(v, float) for v in metrics.values())
    assert not any("case" in k and k != TEST_NUM_CASES_KEY for k in metrics)


def test_a_site_with_two_sequences_scores_with_them_only(tiny_federation: str) -> None:
    site = _site(tiny_federation, "site-3")  # t2 + flair; its test cases hold only those files
    datalist = json.loads(Path(site.datalist).read_text())
    assert datalist["test"] and all(e["image"][0] is None and e["image"][1] is None for e in datalist["test"])
    model = _net()
    metrics = site_test_metrics(model, site, TrainConfig.from_dict({"data": DATA}).data, min_cases=1)
    assert metrics[TEST_NUM_CASES_KEY] == len(datalist["test"])
    assert cross_site_metric_key("dice", None, all15=True) not in metrics and len(metrics) == 9
    # the same score as the evaluation of that combination where the case has all four sequences
    pooled = evaluate_combinations(
        model,
        json.loads(Path(tiny_federation).read_text())["test_datalist"]
        if Path(json.loads(Path(tiny_federation).read_text())["test_datalist"]).is_absolute()
        else str(Path(tiny_federation).parent / json.loads(Path(tiny_federation).read_text())["test_datalist"]),
        data=DATA,
        combinations=["t2+flair"],
        overlap=0.5,
    )
    site_cases = {e["case_id"] for e in datalist["test"]}
    rows = [i for i, c in enumerate(pooled["cases"]) if c in site_cases]
    per_case = pooled["combinations"]["t2+flair"]["per_case"]["dice"]
    expected = sum(sum(per_case[i]) / 3 for i in rows) / len(rows)
    assert metrics["test_mean_dice"] == pytest.approx(expected, abs=1e-5)


def test_a_combination_beyond_the_available_sequences_is_refused(tiny_federation: str) -> None:
    site = _site(tiny_federation, "site-3")
    with pytest.raises(ValueError, match="outside the available"):
        evaluate_combinations(_net(), site.datalist, data=DATA, combinations=["t1+flair"], available=site.modalities)


def test_a_site_without_labelled_test_cases_says_so(tiny_federation: str, tmp_path: Path) -> None:
    site = _site(tiny_federation, "site-2")
    datalist = json.loads(Path(site.datalist).read_text())
    del datalist["test"]
    path = tmp_path / "no_test.json"
    path.write_text(json.dumps(datalist))
    assert site_test_metrics(_net(), dataclasses.replace(site, datalist=str(path)), TrainConfig().data) == {
        TEST_NUM_CASES_KEY: 0.0
    }
    assert site_test_cases(dataclasses.replace(site, labelled=False)) == 0


def test_a_received_model_is_built_from_its_spec_and_wrong_weights_are_named(tiny_federation: str) -> None:
    site = _site(tiny_federation, "site-2")
    config = TrainConfig.from_dict({"data": DATA, "min_test_cases": 1})
    net = _net()
    params = {k: v.numpy() for k, v in net.state_dict().items()}
    metrics = score_received_model(model_spec(net), params, site, config)
    assert metrics[TEST_NUM_CASES_KEY] >= 1
    other = build_network("segresnet", init_filters=16)
    with pytest.raises(ValueError, match="do not fit"):
        score_received_model(model_spec(other), params, site, config)
    with pytest.raises(ValueError):
        score_received_model({"path": "os.system", "args": {}}, params, site, config)


def test_the_server_accepts_aggregate_test_metrics_only() -> None:
    ok = FLModel(metrics={TEST_NUM_CASES_KEY: 2.0, "test_mean_dice": 0.5}, meta={})
    assert result_problem(ok) is None
    assert "weights" in result_problem(FLModel(params={"w": [1.0]}, metrics={"test_mean_dice": 0.5}))
    assert "undeclared" in result_problem(FLModel(metrics={"test_mean_dice": 0.5, "case_Brats18_1_dice": 0.7}))
    assert "finite" in result_problem(FLModel(metrics={"test_mean_dice": float("nan")}))
    assert "failed" in result_problem(FLModel(metrics={}, meta={"site_error": "ValueError: no file"}))
    assert "no metrics" in result_problem(FLModel(metrics={}))


def test_jobs_end_with_the_cross_site_evaluation_where_their_method_has_one() -> None:
    from fedbrats.jobgen import JobOptions, job_spec

    assert job_spec("fedavg").cross_site_eval == {"submit_site_models": False}
    assert job_spec("fedmic").cross_site_eval == {"submit_site_models": True}  # personalised models, cross-site
    assert job_spec("mmccd").cross_site_eval is None  # not a segmenter
    assert job_spec(JobOptions("fedkd", cross_site_eval=False)).cross_site_eval is None
    server = json.loads(_job_file("fedkd", "app/config/config_fed_server.json"))
    workflows = [w["path"] for w in server["workflows"]]
    assert workflows[-1].endswith("FedBratsCrossSiteEval") and len(workflows) == 2


def _job_file(name: str, rel: str) -> str:
    from fedbrats.recipe import job_files

    return job_files(name)[rel].decode()


def test_the_workflow_refuses_a_bad_models_argument() -> None:
    with pytest.raises(ValueError, match="models must map"):
        FedBratsCrossSiteEval(models={"final": 3})  # type: ignore[dict-item]
    assert FedBratsCrossSiteEval().models is None


def test_on_demand_models_of_a_run_folder_and_of_an_exported_model(tmp_path: Path) -> None:
    from fedbrats.job import evaluation_models

    run = tmp_path / "run"
    (run / "app_server").mkdir(parents=True)
    for path in (run / "app_server" / FINAL_MODEL, run / "app_server" / BEST_MODEL):
        path.write_bytes(b"x")
    assert evaluation_models([str(run)]) == {
        FINAL_MODEL: str(run / "app_server" / FINAL_MODEL),
        BEST_MODEL: str(run / "app_server" / BEST_MODEL),
    }
    # a local-only run: its global model is the untrained initial one, its site models are the result
    local = tmp_path / "local"
    (local / "app_server").mkdir(parents=True)
    (local / "site_models").mkdir()
    for path in (local / "app_server" / FINAL_MODEL, local / "site_models" / "A.pt", local / "site_models" / "B.pt"):
        path.write_bytes(b"x")
    assert evaluation_models([str(local)]) == {
        "A": str(local / "site_models" / "A.pt"),
        "B": str(local / "site_models" / "B.pt"),
    }
    bundle = tmp_path / "bundle" / "models"
    bundle.mkdir(parents=True)
    (bundle / "model.pt").write_bytes(b"x")
    both = evaluation_models([str(run), str(tmp_path / "bundle")])
    assert both["bundle"] == str(bundle / "model.pt") and f"run/{FINAL_MODEL}" in both
    with pytest.raises(ValueError, match="needs --model"):
        evaluation_models([])
    with pytest.raises(ValueError, match="does not exist"):
        evaluation_models([str(tmp_path / "nowhere")])


def test_a_site_with_fewer_test_cases_than_the_minimum_sends_the_count_alone(tiny_federation: str) -> None:
    from fedbrats.federated.server.cross_site_report import cross_site_summary, format_cross_site_markdown

    site = _site(tiny_federation, "site-2")  # one test case in the tiny federation
    assert site_test_cases(site) == 1
    metrics = site_test_metrics(_net(), site, TrainConfig.from_dict({"data": DATA}).data, min_cases=2)
    assert metrics == {TEST_NUM_CASES_KEY: 1.0}  # that patient's score stays at the site
    scored = site_test_metrics(_net(), site, TrainConfig.from_dict({"data": DATA}).data, min_cases=1)
    summary = cross_site_summary({"site-2": {FINAL_MODEL: metrics}, "site-1": {FINAL_MODEL: {**scored}}})
    model = summary["models"][FINAL_MODEL]
    assert model["withheld"] == {"site-2": 1} and list(model["sites"]) == ["site-1"]
    assert model["site_weighted_mean"]["num_sites"] == 1
    assert "withheld (1 case)" in format_cross_site_markdown(summary)
    with pytest.raises(ValueError, match="min_test_cases"):
        TrainConfig.from_dict({"min_test_cases": 0})


def test_after_training_only_the_sites_of_the_final_validation_are_asked(tmp_path: Path, monkeypatch) -> None:
    """A site that crashed in training may be connected again without running the job: asking it would hold the
    evaluation for its whole timeout."""
    workflow = FedBratsCrossSiteEval()
    monkeypatch.setattr(workflow, "get_run_dir", lambda: str(tmp_path))
    monkeypatch.setattr(workflow, "warning", lambda *a, **k: None)
    assert workflow._live_sites(["A", "B"]) == ["A", "B"]  # no training record: every connected site
    history = [{"round": 0, "sites": {"A": {}, "B": {}}}, {"round": 1, "final_validation": True, "sites": {"A": {}}}]
    (tmp_path / "metrics.json").write_text(json.dumps(history))
    assert workflow._live_sites(["A", "B"]) == ["A"]
    workflow._json_val_results = {"A": {FINAL_MODEL: {"test_num_cases": 2.0}}}
    workflow._name_silent_sites(["A"], left_out=["B"])
    assert "final validation" in workflow._errors["B"][FINAL_MODEL]
    on_demand = FedBratsCrossSiteEval(models={"m": str(tmp_path / "m.pt")})
    monkeypatch.setattr(on_demand, "get_run_dir", lambda: str(tmp_path))
    assert on_demand._live_sites(["A", "B"]) == ["A", "B"]  # an evaluation-only job asks every site


def test_a_report_that_cannot_be_drawn_leaves_the_saved_results_and_the_job(tmp_path: Path, monkeypatch) -> None:
    import fedbrats.federated.server.cross_site as cross_site

    def broken(run_dir: str) -> dict[str, str]:
        raise RuntimeError("no display")

    logged: list[str] = []
    workflow = FedBratsCrossSiteEval()
    monkeypatch.setattr(cross_site, "write_cross_site_report", broken)
    monkeypatch.setattr(workflow, "get_run_dir", lambda: str(tmp_path))
    monkeypatch.setattr(workflow, "exception", logged.append)
    workflow._report()  # no exception: the job goes on
    assert logged and "no display" in logged[0]
