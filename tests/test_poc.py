"""PoC mode on one machine (deploy.poc): one command from prepare to a downloaded model and a clean stop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from deploy.poc import POC_PROJECT_NAME, PocDeployment
from deploy.processes import find_processes, port_is_free
from fedbrats.recipe import write_job
from tests.helpers import nvflare_available

TINY_TRAINING = {"epochs_per_round": 1, "data": {"roi_size": [16, 16, 16], "batch_size": 1}}


@pytest.fixture(scope="module", autouse=True)
def _needs_nvflare() -> None:
    nvflare_available()


@pytest.fixture
def tiny_job(tmp_path: Path) -> str:
    """A one-round FedAvg job on 16^3 crops (its own copy, so submission leaves jobs/ untouched)."""
    return write_job("fedavg", str(tmp_path / "jobs"), num_rounds=1, **TINY_TRAINING)


def _user_nvflare_config() -> tuple[bool, float]:
    path = Path.home() / ".nvflare" / "config.conf"
    return (path.is_file(), path.stat().st_mtime if path.is_file() else 0.0)


@pytest.mark.integration
def test_poc_two_sites_one_round_then_nothing_left(tmp_path: Path, tiny_job: str) -> None:
    user_config_before = _user_nvflare_config()
    deployment = PocDeployment(str(tmp_path / "ws"), 2, cases_per_site=3, size=16)
    out = tmp_path / "out"
    try:
        report = deployment.run(tiny_job, str(out), timeout=240)
    finally:  # whatever happened, nothing of this workspace may keep running
        leftovers = find_processes(deployment.marker, [deployment.workspace])

    assert report.error == "", report.error
    assert report.status == "FINISHED:COMPLETED"
    assert report.sites == ["site-1", "site-2"]
    # the global model came back and holds weights only
    assert report.global_model and os.path.isfile(report.global_model)
    checkpoint = torch.load(report.global_model, weights_only=True)
    assert checkpoint["model"] and all(isinstance(v, torch.Tensor) for v in checkpoint["model"].values())
    # the federated evaluation ran at the end: its results and matrix came back with the job, from every site
    from fedbrats.federated.server.cross_site_report import read_cross_site_results

    results, errors = read_cross_site_results(report.result_dir)
    assert errors == {} and sorted(results) == ["site-1", "site-2"]
    assert all("test_num_cases" in metrics for site in results.values() for metrics in site.values())
    assert list(Path(report.result_dir).rglob("cross_site_matrix.md"))
    # timings of every step and of the round were measured and reported
    saved = json.loads((out / "run_report.json").read_text())
    for key in ("prepare_s", "start_s", "job_s", "download_s", "stop_s", "gone_s"):
        assert saved["timings"][key] >= 0, key
    assert [r["round"] for r in saved["timings"]["rounds"]] == [0]
    # each site read its data from its own kit's local/fedbrats_site.json, not from the job
    kits = Path(deployment.poc_workspace) / POC_PROJECT_NAME / "prod_00"
    for site in ("site-1", "site-2"):
        site_logs = list((kits / site / report.job_id).glob("log.txt"))
        assert site_logs and f"{site}/local/fedbrats_site.json" in site_logs[0].read_text()
    # the orderly stop left nothing: no process to kill, the port is free, the user's ~/.nvflare untouched
    assert report.leftovers == []
    assert report.port_free and port_is_free(report.port)
    assert leftovers == []
    assert _user_nvflare_config() == user_config_before
    assert report.ok
