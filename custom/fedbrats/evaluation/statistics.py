"""Statistics over replicated runs: mean ± standard deviation over seeds and paired bootstrap intervals.

Runs of two methods are paired by seed (same initial-model seed, same data order) and by test case and
sequence combination: the difference of their Dice is taken per (case, combination), averaged over the seeds
both methods have, and its mean gets a 95 % interval from a bootstrap over test cases. Cases are resampled
whole (with all their 15 combinations), because the combinations of one case are not independent draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedbrats.constants import REGIONS, combination_name, modality_combinations


def case_by_combination_dice(results: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """Per-case Dice (mean over WT/TC/ET) of one evaluation, as ``(case_ids, array cases x combinations)``.

    Combinations are in canonical order (all 15 must be present).

    Raises:
        ValueError: a combination or its per-case values are missing.
    """
    rows = results.get("combinations") or {}
    columns = []
    for combo in modality_combinations():
        name = combination_name(combo)
        per_case = (rows.get(name) or {}).get("per_case")
        if not per_case:
            raise ValueError(f"results of {results.get('model', '?')!r} hold no per-case values for {name!r}")
        columns.append(np.asarray(per_case["dice"], dtype=np.float64).mean(axis=1))
    return [str(c) for c in results.get("cases") or range(len(columns[0]))], np.stack(columns, axis=1)


def seed_summary(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of the 15-combination mean (Dice per region and mean, HD95 mean),
    of the all-four-sequences row, and of every combination's mean Dice.

    Args:
        runs: seed -> results of :func:`fedbrats.evaluation.evaluate.evaluate_combinations`.

    Raises:
        ValueError: no runs.
    """
    if not runs:
        raise ValueError("no runs to summarise")

    def stats(values: Sequence[float]) -> dict[str, float]:
        arr = np.asarray(values, dtype=np.float64)
        return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}

    out: dict[str, Any] = {"seeds": sorted(runs)}
    for part in ("mean_over_combinations", "full_modality"):
        rows = [r[part] for r in runs.values() if r.get(part)]
        if not rows:
            continue
        out[part] = {
            "dice": {region: stats([row["dice"][region] for row in rows]) for region in REGIONS},
            "mean_dice": stats([row["mean_dice"] for row in rows]),
            "mean_hd95": stats([row["mean_hd95"] for row in rows]),
        }
    names = [combination_name(c) for c in modality_combinations()]
    out["combinations"] = {
        name: stats([r["combinations"][name]["mean_dice"] for r in runs.values()])
        for name in names
        if all(name in (r.get("combinations") or {}) for r in runs.values())
    }
    return out


def paired_difference(
    runs_a: Mapping[int, Mapping[str, Any]],
    runs_b: Mapping[int, Mapping[str, Any]],
    n_bootstrap: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean Dice difference A - B over (test case x combination), paired by seed, with a bootstrap 95 % interval.

    Also the ratio of A's to B's 15-combination mean Dice (averaged over the shared seeds).

    Args:
        runs_a: seed -> results of method A.
        runs_b: seed -> results of method B (same test cases).
        n_bootstrap: bootstrap resamples of the test cases.
        seed: seed of the bootstrap.

    Raises:
        ValueError: no seed in common, or the two methods were scored on different cases.
    """
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        raise ValueError(f"no seed in common (A: {sorted(runs_a)}, B: {sorted(runs_b)}); pairing needs the same seeds")
    diffs, means_a, means_b = [], [], []
    for s in seeds:
        cases_a, dice_a = case_by_combination_dice(runs_a[s])
        cases_b, dice_b = case_by_combination_dice(runs_b[s])
        if cases_a != cases_b:
            raise ValueError(f"seed {s}: the two methods were scored on different test cases; pairing needs the same")
        diffs.append(dice_a - dice_b)
        means_a.append(dice_a.mean())
        means_b.append(dice_b.mean())
    per_case = np.mean(diffs, axis=0).mean(axis=1)  # each case: its mean over combinations and seeds
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_case), size=(n_bootstrap, len(per_case)))
    boot = per_case[draws].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {
        "seeds": seeds,
        "num_cases": int(len(per_case)),
        "num_combinations": int(diffs[0].shape[1]),
        "mean_difference": float(per_case.mean()),
        "ci95": [float(low), float(high)],
        "ratio": float(np.mean(means_a) / np.mean(means_b)) if np.mean(means_b) > 0 else float("nan"),
        "bootstrap": {"resamples": n_bootstrap, "unit": "test case (all its combinations)", "seed": seed},
    }


__all__ = ["case_by_combination_dice", "paired_difference", "seed_summary"]
