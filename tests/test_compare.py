"""The comparison tool's own logic: override merging and the local-only mean over site models."""

from __future__ import annotations

import os

import pytest

from experiments.compare import COMPRESSION, EXPERIMENTS, PAIRS, PRIVACY, _average_results, compression_of
from fedbrats.constants import REGIONS
from fedbrats.jobgen import JOBS
from fedbrats.utils import deep_merge


def _row(value: float) -> dict:
    return {
        "modalities": ["t1"],
        "dice": dict.fromkeys(REGIONS, value),
        "hd95": dict.fromkeys(REGIONS, 10 * value),
        "mean_dice": value,
        "mean_hd95": 10 * value,
        "per_case": {"dice": [[value] * 3, [value / 2] * 3], "hd95": [[10 * value] * 3] * 2},
    }


def test_merge_is_deep_and_does_not_mutate() -> None:
    base = {"data": {"roi_size": [32, 32, 32], "zoom": 1.0}, "lr": 1e-3}
    out = deep_merge(base, {"data": {"zoom": 0.5}})
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
    # per case too, so that local-only pairs with other methods case by case
    assert out["combinations"]["t1"]["per_case"]["dice"][1] == pytest.approx([0.15] * 3)


def test_every_experiment_names_a_real_job() -> None:
    assert {job for job, _, _ in EXPERIMENTS.values()} <= set(JOBS)
    assert set(PRIVACY) <= set(EXPERIMENTS)


def test_compression_experiments_run_their_job_and_pair_with_it_uncompressed() -> None:
    assert {"fedavg_svd", "fedkd_svd", "mstkd_svd"} <= set(COMPRESSION)
    for name, (job, args) in COMPRESSION.items():
        assert EXPERIMENTS[name][0] == job
        assert compression_of(name) == args
        # the uncompressed run of the same job is an experiment of its own, and the report pairs the two
        assert job in EXPERIMENTS and (name, job) in PAIRS
    assert EXPERIMENTS["fedkd_svd"][0] == "fedkd"
    assert compression_of("fedkd") is None and compression_of("fedavg") is None


# ---- replicated, paired comparison ---------------------------------------------------------------------------
def _results(level: float, cases: list[str], noise: float = 0.0, seed: int = 0) -> dict:
    """Full results of all 15 combinations: each case's Dice ``level`` (+ per-case noise)."""
    import numpy as np

    from fedbrats.constants import combination_name, modality_combinations

    rng = np.random.default_rng(seed)
    rows = {}
    for combo in modality_combinations():
        per_case = np.clip(level + noise * rng.standard_normal(len(cases)), 0, 1)
        row = _row(float(per_case.mean()))
        row["per_case"] = {"dice": [[v] * 3 for v in per_case], "hd95": [[1.0] * 3 for _ in cases]}
        rows[combination_name(combo)] = row
    full = rows["t1+t1ce+t2+flair"]
    return {
        "model": "m",
        "num_cases": len(cases),
        "cases": cases,
        "combinations": rows,
        "full_modality": full,
        "mean_over_combinations": {k: v for k, v in full.items() if k != "per_case"},
    }


def test_paired_difference_recovers_a_known_shift() -> None:
    from fedbrats.evaluation.statistics import paired_difference

    cases = [f"c{i}" for i in range(12)]
    b = {s: _results(0.5, cases, noise=0.1, seed=s) for s in range(3)}
    a = {
        s: {
            **r,
            "combinations": {
                k: {
                    **row,
                    "per_case": {
                        "dice": [[v + 0.1 for v in c] for c in row["per_case"]["dice"]],
                        "hd95": row["per_case"]["hd95"],
                    },
                }
                for k, row in r["combinations"].items()
            },
        }
        for s, r in b.items()
    }
    d = paired_difference(a, b)
    assert d["mean_difference"] == pytest.approx(0.1)
    assert d["ci95"][0] == pytest.approx(0.1) and d["ci95"][1] == pytest.approx(0.1)  # a constant shift: no spread
    assert d["runs"] == [0, 1, 2] and d["num_cases"] == 12 and d["num_combinations"] == 15
    noisy = paired_difference({s: _results(0.55, cases, 0.2, seed=10 + s) for s in range(3)}, b)
    assert noisy["ci95"][0] < noisy["mean_difference"] < noisy["ci95"][1]
    with pytest.raises(ValueError, match="no run in common"):
        paired_difference({5: b[0]}, b)
    with pytest.raises(ValueError, match="different test cases"):
        paired_difference({0: _results(0.5, cases[:-1])}, b)


def test_write_comparison_reports_mean_std_and_pairs(tmp_path) -> None:
    import json

    from experiments.compare import write_comparison

    cases = ["c0", "c1", "c2", "c3"]
    runs = {
        "fedavg": {s: _results(0.5 + 0.01 * s, cases, 0.05, s) for s in range(3)},
        "fedkd": {s: _results(0.6, cases, 0.05, 10 + s) for s in range(3)},
        "centralized": {s: _results(0.8, cases, 0.05, 20 + s) for s in range(3)},
    }
    path = write_comparison(str(tmp_path), "sites.json", runs, ["fedbrats compare --seeds 0,1,2"])
    text = open(path, encoding="utf-8").read()
    assert "| fedkd vs fedavg | 3 |" in text and "| fedavg vs centralized | 3 |" in text
    assert "± " in text and "fedbrats compare --seeds 0,1,2" in text
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert summary["methods"]["fedavg"]["mean_over_combinations"]["mean_dice"]["std"] > 0
    assert summary["paired"]["fedkd vs centralized"]["mean_difference"] < 0


def test_cross_validation_runs_are_named_by_fold_and_pooled_in_the_report(tmp_path) -> None:
    import json

    from experiments.compare import fold_sites_files, replicate_key, run_folder, write_comparison

    assert replicate_key(1) == 1 and replicate_key(1, 2) == "fold2/seed1"
    assert run_folder("W", "fedavg", 1, 2).endswith("fedavg/fold2/seed1") and run_folder("W", "x", 0).endswith(
        "x/seed0"
    )
    with pytest.raises(ValueError, match="folds.json"):
        fold_sites_files(str(tmp_path))
    (tmp_path / "folds.json").write_text(json.dumps({"folds": 2}))
    with pytest.raises(ValueError, match="missing"):
        fold_sites_files(str(tmp_path))
    runs = {
        name: {
            f"fold{k}/seed{s}": _results(level + 0.01 * s, [f"f{k}c{i}" for i in range(4)], 0.05, 10 * k + s)
            for k in range(2)
            for s in range(2)
        }
        for name, level in (("fedavg", 0.5), ("fedkd", 0.6))
    }
    path = write_comparison(str(tmp_path), "FOLDS/folds.json", runs, ["cmd"])
    text = open(path, encoding="utf-8").read()
    assert "Cross-validation: 2 folds" in text and "| fedkd vs fedavg | 4 | 8 |" in text
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert summary["methods"]["fedkd"]["seeds"] == ["seed0", "seed1"]
    assert len(summary["methods"]["fedkd"]["runs"]) == 4
    assert set(summary["paired"]["fedkd vs fedavg"]["per_run"]) == {
        "fold0/seed0",
        "fold0/seed1",
        "fold1/seed0",
        "fold1/seed1",
    }


def test_each_runs_cross_site_evaluation_is_reported_beside_its_results(tmp_path) -> None:
    import json

    from experiments.compare import copy_cross_site_reports, run_folder
    from fedbrats.runs import RunFolder
    from fedbrats.simulate import simulated_run_dir

    metrics = {"test_num_cases": 3.0, "test_mean_dice": 0.6, **{f"test_dice_{r}": 0.6 for r in REGIONS}}
    run = RunFolder(simulated_run_dir(run_folder(str(tmp_path / "ws"), "fedavg", 0, 1)))
    os.makedirs(os.path.dirname(run.cross_site_results))
    with open(run.cross_site_results, "w", encoding="utf-8") as f:
        json.dump({"CBICA": {"FL_global_model.pt": metrics}}, f)
    written = copy_cross_site_reports(str(tmp_path / "ws"), str(tmp_path / "out"), ["fedavg", "fedkd"], [0], [0, 1])
    assert written == [str(tmp_path / "out" / "fedavg" / "fold1" / "seed0" / "cross_site")]  # runs without none
    matrix = open(os.path.join(written[0], "cross_site_matrix.md"), encoding="utf-8").read()
    assert "CBICA (3 cases)" in matrix and "0.600" in matrix
