"""The federated evaluation on demand (``python -m fedbrats.job evaluate``) in NVFlare's simulator, against a
finished run and an exported bundle: the same scores as the evaluation the run ended with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedbrats.evaluation.export import main as export_main
from fedbrats.federated.server.cross_site_report import read_cross_site_results
from fedbrats.job import main as job_main
from fedbrats.simulate import simulate

pytestmark = pytest.mark.integration

TINY = {"epochs_per_round": 1, "min_test_cases": 1, "data": {"roi_size": [16, 16, 16], "batch_size": 1}}


def test_on_demand_evaluation_of_a_run_and_a_bundle_matches_the_jobs_own(tiny_federation: str, tmp_path: Path) -> None:
    result = simulate("fedavg", str(tmp_path / "run"), sites_file=tiny_federation, num_rounds=1, training=TINY)
    in_job, errors = read_cross_site_results(result.run_dir)
    assert errors == {} and sorted(in_job) == ["site-1", "site-2", "site-3", "site-4"]
    bundle = tmp_path / "bundle"
    assert export_main(["--run-dir", result.run_dir, "--out-dir", str(bundle), "--no-torchscript"]) == 0

    workspace = tmp_path / "eval"
    argv = ["evaluate", "--model", result.run_dir, "--model", str(bundle), "--env", "sim", "--workspace"]
    assert job_main([*argv, str(workspace), "--sites", tiny_federation, "--set", "min_test_cases=1"]) == 0
    results, errors = read_cross_site_results(str(workspace))
    assert errors == {}
    for site, by_model in results.items():
        assert sorted(by_model) == ["bundle", "simulate_job/FL_global_model.pt", "simulate_job/best_FL_global_model.pt"]
        # the run's final model, scored again on demand, scores what it scored at the end of the job
        on_demand = by_model["simulate_job/FL_global_model.pt"]
        assert on_demand["test_mean_dice"] == pytest.approx(in_job[site]["FL_global_model.pt"]["test_mean_dice"])
        # the bundle holds the run's best model
        assert by_model["bundle"]["test_mean_dice"] == pytest.approx(
            by_model["simulate_job/best_FL_global_model.pt"]["test_mean_dice"]
        )
    assert list(workspace.rglob("cross_site_matrix.md"))
    # a path that holds no model is named before anything is submitted
    assert (
        job_main(["evaluate", "--model", str(tmp_path / "nowhere"), "--env", "sim", "--workspace", str(workspace)]) == 1
    )
    assert not os.path.exists(tmp_path / "nowhere")
