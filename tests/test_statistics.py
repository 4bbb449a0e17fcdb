"""The statistics behind every comparison, and the metric conventions every reported Dice and HD95 rests on.

The interval tests draw scores with a known structure (a true difference, per-run offsets, per-case effects
shared by a case's 15 combinations, cell noise) and count how often the interval covers the truth. They fail when
the resampling unit becomes a (case, combination) cell, when the seeds are averaged before resampling, or when
the cases of a test set stop being shared by its runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedbrats.constants import HD95_MISS_VALUE, REGIONS, combination_name, modality_combinations
from fedbrats.evaluation.evaluate import mean_over_rows, table_row
from fedbrats.evaluation.statistics import (
    hierarchical_bootstrap,
    own_sequence_scores,
    paired_difference,
    pool_folds,
    seed_summary,
    t_interval,
)
from fedbrats.scoring.metrics import region_dice, region_hd95

COMBOS = [combination_name(c) for c in modality_combinations()]
TRUE_DIFFERENCE = 0.03


def results_from(dice: np.ndarray, cases: list[str], sites: list[str] | None = None) -> dict:
    """Full results (as ``evaluate_combinations`` writes them) from per-(case, combination) Dice, the same value
    for WT, TC and ET."""
    rows = {}
    for k, name in enumerate(COMBOS):
        per_case = torch.tensor(np.repeat(dice[:, k : k + 1], 3, axis=1), dtype=torch.float64)
        rows[name] = table_row(per_case, torch.ones_like(per_case), name.split("+"))
    out = {
        "model": "m",
        "num_cases": len(cases),
        "cases": cases,
        "combinations": rows,
        "mean_over_combinations": mean_over_rows(list(rows.values())),
        "full_modality": rows[COMBOS[-1]],
    }
    if sites:
        out["case_sites"] = sites
    return out


def crossed_scores(rng: np.random.Generator, seeds: int, cases: int = 24) -> np.ndarray:
    """Differences A - B, seeds x cases x combinations: per-seed offsets, per-case effects shared by a case's
    combinations (and by the seeds, which score the same cases), case x combination effects, cell noise."""
    seed_offset = rng.normal(0, 0.03, (seeds, 1, 1))
    case_effect = rng.normal(0, 0.05, (1, cases, 1))
    case_combination = rng.normal(0, 0.03, (1, cases, len(COMBOS)))
    cell = rng.normal(0, 0.05, (seeds, cases, len(COMBOS)))
    return TRUE_DIFFERENCE + seed_offset + case_effect + case_combination + cell


def coverage(interval: Callable[[np.ndarray, np.random.Generator], tuple[float, float]], seeds: int) -> float:
    rng = np.random.default_rng(1)
    draws = 150
    hits = 0
    for _ in range(draws):
        low, high = interval(crossed_scores(rng, seeds), rng)
        hits += low <= TRUE_DIFFERENCE <= high
    return hits / draws


def project_interval(diff: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """The project's interval, through its public entry point on full results dictionaries."""
    cases = [f"c{i}" for i in range(diff.shape[1])]
    base = rng.uniform(0.3, 0.7, diff.shape)
    runs_a = {s: results_from(base[s] + diff[s], cases) for s in range(diff.shape[0])}
    runs_b = {s: results_from(base[s], cases) for s in range(diff.shape[0])}
    d = paired_difference(runs_a, runs_b, n_bootstrap=1000, seed=int(rng.integers(1 << 30)))
    return d["ci95"][0], d["ci95"][1]


def percentile(values: np.ndarray, rng: np.random.Generator, size: int = 1000) -> tuple[float, float]:
    boot = values[rng.integers(0, len(values), (size, len(values)))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(low), float(high)


def test_interval_covers_the_true_difference_and_the_wrong_units_do_not() -> None:
    seeds = 6
    right = coverage(project_interval, seeds)
    # Seeds averaged before the cases are resampled: the seed-to-seed spread drops out.
    seeds_first = coverage(lambda d, rng: percentile(d.mean(axis=(0, 2)), rng), seeds)
    # (case, combination) cells as the unit: the 15 correlated combinations count as independent draws.
    cells = coverage(lambda d, rng: percentile(d.mean(axis=0).ravel(), rng), seeds)
    assert right >= 0.88, right
    assert seeds_first <= right - 0.1, (seeds_first, right)
    assert cells <= 0.6, cells


def test_cases_shared_by_runs_are_resampled_together() -> None:
    """Runs scored on one test set share its cases: resampling the cases per run independently is too narrow."""
    rng = np.random.default_rng(3)
    case_effect = rng.normal(0, 0.05, 24)  # what the runs share
    per_run = [case_effect + rng.normal(0, 0.005, 24) for _ in range(6)]
    shared = hierarchical_bootstrap(per_run, [0] * 6, 4000, np.random.default_rng(0))
    independent = hierarchical_bootstrap(per_run, list(range(6)), 4000, np.random.default_rng(0))
    assert shared.std() > 1.4 * independent.std()


def test_fold_runs_count_the_run_to_run_spread() -> None:
    """3 folds x 1 seed, each fold its own 8 cases: the interval widens with the runs' spread, the point estimate
    is the mean of the runs."""
    rng = np.random.default_rng(0)
    cases = rng.normal(0, 0.02, 24)

    def runs(offsets: list[float]) -> tuple[list[np.ndarray], list[int]]:
        return [cases[8 * k : 8 * k + 8] + offsets[k] for k in range(3)], [0, 1, 2]

    calm = hierarchical_bootstrap(*runs([0.03, 0.03, 0.03]), 4000)
    spread = hierarchical_bootstrap(*runs([0.0, 0.03, 0.06]), 4000)
    assert spread.std() > 2 * calm.std()
    assert np.percentile(spread, 2.5) < 0.0 < np.percentile(calm, 2.5) + 0.05


def test_paired_difference_reports_runs_intervals_and_notes() -> None:
    rng = np.random.default_rng(5)
    cases = [f"c{i}" for i in range(5)]
    base = rng.uniform(0.3, 0.7, (3, 5, 15))
    shift = np.array([0.05, -0.01, 0.02])[:, None, None]
    runs_a = {s: results_from(base[s] + shift[s], cases) for s in range(3)}
    runs_b = {s: results_from(base[s], cases) for s in range(3)}
    d = paired_difference(runs_a, runs_b)
    assert d["per_run"] == pytest.approx({"0": 0.05, "1": -0.01, "2": 0.02})
    assert d["mean_difference"] == pytest.approx(0.02)
    # seed-to-seed spread is in both intervals: neither excludes 0
    assert d["ci95"][0] < 0 < d["ci95"][1]
    assert d["t_interval"][0] < 0 < d["t_interval"][1]
    assert d["num_runs"] == 3 and d["num_cases"] == 5 and d["num_test_sets"] == 1
    assert any("5 test cases" in note and "p < 0.05" in note for note in d["notes"])
    with pytest.raises(ValueError, match="no run in common"):
        paired_difference({7: runs_a[0]}, runs_b)
    with pytest.raises(ValueError, match="different test cases"):
        paired_difference({0: results_from(base[0][:4], cases[:4])}, runs_b)


def test_t_interval_matches_the_t_distribution() -> None:
    low, high = t_interval([0.01, 0.03, 0.05])
    # mean 0.03, sd 0.02, n 3: half-width t(0.975, 2) * 0.02 / sqrt(3) = 4.303 * 0.011547
    assert low == pytest.approx(0.03 - 0.049687, abs=1e-5) and high == pytest.approx(0.03 + 0.049687, abs=1e-5)
    assert t_interval([0.1]) is None


def test_pool_folds_concatenates_cases_per_seed() -> None:
    rng = np.random.default_rng(0)
    folds = {k: rng.uniform(0, 1, (3, 15)) for k in range(3)}
    runs = {
        f"fold{k}/seed{s}": results_from(folds[k] + 0.1 * s, [f"f{k}c{i}" for i in range(3)], ["A", "B", "A"])
        for k in range(3)
        for s in range(2)
    }
    runs.pop("fold2/seed1")  # a seed missing a fold is left out
    pooled = pool_folds(runs)
    assert list(pooled) == ["seed0"]
    assert pooled["seed0"]["num_cases"] == 9 and len(pooled["seed0"]["cases"]) == 9
    everything = np.concatenate([folds[k] for k in range(3)])
    assert pooled["seed0"]["mean_over_combinations"]["mean_dice"] == pytest.approx(everything.mean())
    assert pooled["seed0"]["case_sites"] == ["A", "B", "A"] * 3
    plain = {0: runs["fold0/seed0"]}
    assert pool_folds(plain) == plain
    summary = seed_summary(pooled)
    assert summary["runs"] == ["seed0"]


def test_own_sequence_scores_use_each_sites_cases_and_sequences() -> None:
    dice = np.zeros((3, 15))
    dice[:, COMBOS.index("t2+flair")] = [0.2, 0.9, 0.4]
    dice[:, COMBOS.index("t1+t1ce+t2+flair")] = [0.8, 0.1, 0.6]
    results = results_from(dice, ["a", "b", "c"], ["full", "two", "full"])
    own = own_sequence_scores(results, {"full": ["t1", "t1ce", "t2", "flair"], "two": ["t2", "flair"]})
    assert own["full"]["mean_dice"] == pytest.approx(0.7) and own["full"]["num_cases"] == 2
    assert own["two"]["mean_dice"] == pytest.approx(0.9) and own["two"]["modalities"] == ["t2", "flair"]
    assert own_sequence_scores({k: v for k, v in results.items() if k != "case_sites"}, {"full": ["t1"]}) == {}
    # site models (local-only): each site is scored by its own model
    own_model = np.zeros((3, 15))
    own_model[:, COMBOS.index("t2+flair")] = [0.0, 0.3, 0.0]
    results["site_results"] = {"two": results_from(own_model, ["a", "b", "c"])}
    own = own_sequence_scores(results, {"full": ["t1", "t1ce", "t2", "flair"], "two": ["t2", "flair"]})
    assert own["two"]["mean_dice"] == pytest.approx(0.3) and own["full"]["mean_dice"] == pytest.approx(0.7)


# ---- metric conventions ----------------------------------------------------------------------------------------
def _masks(pred: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One case, the same mask for WT, TC and ET."""
    return (
        torch.tensor(np.stack([pred] * 3)[None], dtype=torch.float32),
        torch.tensor(np.stack([label] * 3)[None], dtype=torch.float32),
    )


def test_dice_values_and_empty_regions() -> None:
    label = np.zeros((8, 8, 8), bool)
    label[2:4, 2:4, 2:4] = True  # 8 voxels
    pred = np.zeros_like(label)
    pred[2:4, 2:4, 2:3] = True  # 4 voxels, all inside
    assert region_dice(*_masks(pred, label)).tolist() == [[pytest.approx(2 * 4 / (4 + 8))] * 3]
    assert region_dice(*_masks(label, label)).tolist() == [[1.0] * 3]
    empty = np.zeros_like(label)
    # ignore_empty=False: nothing predicted where nothing is, 1; a false positive on an empty region, 0
    assert region_dice(*_masks(empty, empty)).tolist() == [[1.0] * 3]
    assert region_dice(*_masks(pred, empty)).tolist() == [[0.0] * 3]
    assert region_dice(*_masks(empty, label)).tolist() == [[0.0] * 3]


def test_hd95_values_and_empty_regions() -> None:
    label = np.zeros((16, 16, 16), bool)
    label[4:8, 4:8, 4:8] = True
    shifted = np.zeros_like(label)
    shifted[4:8, 4:8, 7:11] = True  # the same cube 3 voxels further along the last axis
    assert region_hd95(*_masks(label, label)).tolist() == [[0.0] * 3]
    assert region_hd95(*_masks(shifted, label), spacing=2.0).tolist() == [[pytest.approx(6.0)] * 3]
    empty = np.zeros_like(label)
    assert region_hd95(*_masks(empty, empty)).tolist() == [[0.0] * 3]
    assert HD95_MISS_VALUE == 373.13
    assert region_hd95(*_masks(empty, label)).tolist() == [[pytest.approx(373.13)] * 3]
    assert region_hd95(*_masks(label, empty)).tolist() == [[pytest.approx(373.13)] * 3]


def test_table_rows_average_cases_then_regions_and_combinations_unweighted() -> None:
    dice = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]], dtype=torch.float64)
    row = table_row(dice, 10 * dice, ["t1"])
    assert row["dice"] == {r: pytest.approx(v) for r, v in zip(REGIONS, [0.5, 0.5, 0.5])}
    assert row["mean_dice"] == pytest.approx(0.5) and row["mean_hd95"] == pytest.approx(5.0)
    other = table_row(torch.ones(5, 3, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64), ["t2"])
    # each combination counts once, whatever its number of cases
    assert mean_over_rows([row, other])["mean_dice"] == pytest.approx(0.75)


def test_aggregate_reports_withhold_a_site_score_that_is_one_cases_score(tmp_path) -> None:
    """With min_site_cases=2 (compare.py --aggregate-only) a site with one test case keeps its count, not its score:
    for real patients that mean would be one patient's Dice."""
    import json

    from experiments.compare import write_comparison

    dice = np.full((3, 15), 0.5)
    dice[1] = 0.9  # the lone case of site "two"
    runs = {"fedavg": {0: results_from(dice, ["a", "b", "c"], ["full", "two", "full"])}}
    sites = {"full": ["t1", "t1ce", "t2", "flair"], "two": ["t2", "flair"]}
    text = open(write_comparison(str(tmp_path), "s.json", runs, ["cmd"], sites, min_site_cases=2)).read()
    assert "withheld (one case)" in text and "0.900" not in text
    own = json.loads((tmp_path / "comparison.json").read_text())["methods"]["fedavg"]["own_sequences"]
    assert own["two"]["num_cases"] == 1 and "mean_dice" not in own["two"] and own["two"]["withheld"]
    assert own["full"]["mean_dice"]["mean"] == pytest.approx(0.5)
    shown = open(write_comparison(str(tmp_path), "s.json", runs, ["cmd"], sites)).read()
    assert "0.900" in shown  # synthetic data: every site shown
