"""The comparison tool's own logic: override merging and the local-only mean over site models."""

from __future__ import annotations

import pytest

from fedbrats.constants import REGIONS
from fedbrats.evaluation.compare import EXPERIMENTS, PRIVACY, _average_results, _merge
from fedbrats.jobgen import JOBS


def _row(value: float) -> dict:
    return {
        "modalities": ["t1"],
        "dice": dict.fromkeys(REGIONS, value),
        "hd95": dict.fromkeys(REGIONS, 10 * value),
        "mean_dice": value,
        "mean_hd95": 10 * value,
    }


def test_merge_is_deep_and_does_not_mutate() -> None:
    base = {"data": {"roi_size": [32, 32, 32], "zoom": 1.0}, "lr": 1e-3}
    out = _merge(base, {"data": {"zoom": 0.5}})
    assert out == {"data": {"roi_size": [32, 32, 32], "zoom": 0.5}, "lr": 1e-3}
    assert base["data"]["zoom"] == 1.0


def test_local_only_results_are_the_mean_of_site_models() -> None:
    per_site = {
        "site-1": {"num_cases": 2, "combinations": {"t1": _row(0.2), "t1+t1ce+t2+flair": _row(0.6)}},
        "site-2": {"num_cases": 2, "combinations": {"t1": _row(0.4), "t1+t1ce+t2+flair": _row(0.8)}},
    }
    out = _average_results(per_site)
    assert out["combinations"]["t1"]["mean_dice"] == pytest.approx(0.3)
    assert out["full_modality"]["dice"]["WT"] == pytest.approx(0.7)
    assert out["mean_over_combinations"]["mean_dice"] == pytest.approx(0.5)
    assert "2 site models" in out["model"]


def test_every_experiment_names_a_real_job() -> None:
    assert {job for job, _, _ in EXPERIMENTS.values()} <= set(JOBS)
    assert set(PRIVACY) <= set(EXPERIMENTS)
