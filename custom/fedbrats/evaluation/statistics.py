"""Statistics over replicated runs: summaries over runs and paired intervals that count every source of variation.

A *run* is one training of one method, named by its seed, or by its fold and seed in a cross-validation
(``"fold0/seed1"``). Runs of two methods pair when they share that name: same data split, same seed, scored on the
same test cases. Three sources of variation separate two methods' scores, and an interval must count all three:

- the test cases: the 15 sequence combinations of one case are strongly correlated, so a case is resampled whole
  (its mean over the combinations), never a (case, combination) cell;
- the runs: seeds (initial model, data order, augmentation) and, in a cross-validation, the folds' training sets;
- the cases shared by several runs: runs of one test set (the seeds of one fold) see the same cases, so those
  cases are resampled once for all of them, not independently per run (which would average their spread away).

:func:`paired_difference` therefore uses a two-level bootstrap: in each resample the runs are drawn with
replacement, and every test set's cases are drawn with replacement once, shared by its runs; the statistic is
the mean over the drawn runs of each run's mean difference over the drawn cases. Beside it: a t-interval over the
per-run mean differences (runs as replicates), and the per-run differences themselves, so a reader sees their
spread. ``tests/test_statistics.py`` checks the bootstrap's coverage on scores of known structure and that it
fails when the resampling unit becomes a (case, combination) cell or the seeds are averaged first.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats

from fedbrats.constants import REGIONS, combination_name, modality_combinations
from fedbrats.evaluation.evaluate import mean_over_rows, table_row

#: Two-sided level of every interval.
CONFIDENCE = 0.95
#: A test on n paired units (signs flipped exactly) cannot reach p < 0.05 with fewer than this many units.
MIN_UNITS_FOR_P05 = 6


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


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def seed_summary(runs: Mapping[Hashable, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over runs of the 15-combination mean (Dice per region and mean, HD95 mean),
    of the all-four-sequences row, and of every combination's mean Dice.

    In a cross-validation pass the runs through :func:`pool_folds` first, so that each summarised run covers
    every case once.

    Args:
        runs: run name -> results of :func:`fedbrats.evaluation.evaluate.evaluate_combinations`.

    Raises:
        ValueError: no runs.
    """
    if not runs:
        raise ValueError("no runs to summarise")
    out: dict[str, Any] = {"runs": sorted(runs, key=str)}
    for part in ("mean_over_combinations", "full_modality"):
        rows = [r[part] for r in runs.values() if r.get(part)]
        if not rows:
            continue
        out[part] = {
            "dice": {region: _mean_std([row["dice"][region] for row in rows]) for region in REGIONS},
            "mean_dice": _mean_std([row["mean_dice"] for row in rows]),
            "mean_hd95": _mean_std([row["mean_hd95"] for row in rows]),
        }
    names = [combination_name(c) for c in modality_combinations()]
    out["combinations"] = {
        name: _mean_std([r["combinations"][name]["mean_dice"] for r in runs.values()])
        for name in names
        if all(name in (r.get("combinations") or {}) for r in runs.values())
    }
    own = [r["own_sequences"] for r in runs.values() if r.get("own_sequences")]
    if own and len(own) == len(runs):
        sites = sorted(set.intersection(*(set(o) for o in own)))
        out["own_sequences"] = {
            site: {
                "modalities": own[0][site]["modalities"],
                "num_cases": own[0][site]["num_cases"],
                "mean_dice": _mean_std([o[site]["mean_dice"] for o in own]),
                "dice": {region: _mean_std([o[site]["dice"][region] for o in own]) for region in REGIONS},
            }
            for site in sites
        }
    return out


def split_run_name(name: Hashable) -> tuple[str | None, str]:
    """``("fold<k>", "seed<s>")`` of a cross-validation run's name, ``(None, name)`` of a plain seed."""
    text = str(name)
    if "/" in text:
        fold, seed = text.split("/", 1)
        return fold, seed
    return None, text


def pool_folds(runs: Mapping[Hashable, Mapping[str, Any]]) -> dict[Hashable, dict[str, Any]]:
    """Per seed, the runs of every fold pooled into one result over all their test cases.

    Runs named by a plain seed are returned as they are. A seed that misses a fold another seed has is left out
    (its pooled result would cover other cases).

    Args:
        runs: run name (``"fold<k>/seed<s>"`` or a seed) -> full results with per-case values.
    """
    by_seed: dict[str, dict[str, Mapping[str, Any]]] = {}
    plain: dict[Hashable, dict[str, Any]] = {}
    for name, results in runs.items():
        fold, seed = split_run_name(name)
        if fold is None:
            plain[name] = dict(results)
        else:
            by_seed.setdefault(seed, {})[fold] = results
    if not by_seed:
        return plain
    all_folds = set().union(*(set(f) for f in by_seed.values()))
    pooled: dict[Hashable, dict[str, Any]] = {}
    for seed, folds in sorted(by_seed.items()):
        if set(folds) != all_folds:
            continue
        parts = [folds[f] for f in sorted(folds)]
        rows = _pooled_rows(parts)
        dropped = ("combinations", "cases", "case_sites", "num_cases", "site_results")
        out = {k: v for k, v in parts[0].items() if k not in dropped}
        out.update(
            model=f"{parts[0].get('model', '?')} ({len(parts)} folds pooled)",
            folds=sorted(folds),
            cases=[c for p in parts for c in p.get("cases", [])],
            num_cases=sum(int(p.get("num_cases", 0)) for p in parts),
            combinations=rows,
            mean_over_combinations=mean_over_rows(list(rows.values())),
            full_modality=rows.get(combination_name(modality_combinations()[-1])),
        )
        if all(p.get("case_sites") for p in parts):
            out["case_sites"] = [s for p in parts for s in p["case_sites"]]
        if all(p.get("site_results") for p in parts):
            site_names = set.intersection(*(set(p["site_results"]) for p in parts))
            out["site_results"] = {
                site: {"combinations": _pooled_rows([p["site_results"][site] for p in parts])} for site in site_names
            }
        pooled[seed] = out
    return pooled


def _pooled_rows(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every combination's row over the cases of all ``parts`` (results of disjoint test sets)."""
    rows = {}
    for name in parts[0]["combinations"]:
        pieces = [p["combinations"][name] for p in parts]
        dice = torch.tensor([v for p in pieces for v in p["per_case"]["dice"]], dtype=torch.float64)
        hd95 = torch.tensor([v for p in pieces for v in p["per_case"]["hd95"]], dtype=torch.float64)
        rows[name] = table_row(dice, hd95, pieces[0].get("modalities"))
    return rows


def own_sequence_scores(results: Mapping[str, Any], site_modalities: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Each site's Dice on its own test cases with its own sequences (the client metric of FedMEMA and FedMEPD).

    Args:
        results: full results with per-case values and ``case_sites`` (written by ``fedbrats prepare``); where they
            hold ``site_results`` (one full result per site model, local-only), each site is scored by its own.
        site_modalities: site -> the sequences it has.

    Returns:
        site -> ``{"modalities", "num_cases", "dice": {region: mean}, "mean_dice"}``; empty when the results do not
        say which site a case comes from.
    """
    sites = results.get("case_sites")
    if not sites:
        return {}
    out: dict[str, Any] = {}
    for site, mods in sorted(site_modalities.items()):
        index = [i for i, s in enumerate(sites) if s == site]
        if not index:
            continue
        # Site models (local-only): a site is scored with its own model.
        scored = (results.get("site_results") or {}).get(site, results)
        row = scored["combinations"].get(combination_name(tuple(mods)))
        if row is None:
            continue
        dice = np.asarray(row["per_case"]["dice"], dtype=np.float64)[index]
        per_region = dice.mean(axis=0)
        out[site] = {
            "modalities": list(mods),
            "num_cases": len(index),
            "dice": {r: float(per_region[i]) for i, r in enumerate(REGIONS)},
            "mean_dice": float(per_region.mean()),
        }
    return out


def hierarchical_bootstrap(
    per_run: Sequence[np.ndarray],
    test_sets: Sequence[Hashable],
    n_bootstrap: int = 10000,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Bootstrap distribution of the mean over runs of each run's mean over its test cases.

    Each resample draws the runs with replacement, and the cases of every test set with replacement once, shared
    by all runs scored on that test set.

    Args:
        per_run: per run, its per-case values (cases in the order of its test set).
        test_sets: per run, which test set it was scored on (runs of one test set have the same cases, in order).
        n_bootstrap: resamples.
        rng: random generator (default: seeded 0).

    Returns:
        ``n_bootstrap`` resampled statistics.

    Raises:
        ValueError: no runs, mismatched lengths, or runs of one test set with different numbers of cases.
    """
    if not per_run or len(per_run) != len(test_sets):
        raise ValueError(f"per_run ({len(per_run)}) and test_sets ({len(test_sets)}) must be equal, non-empty lists")
    rng = rng or np.random.default_rng(0)
    runs = len(per_run)
    run_means = np.empty((n_bootstrap, runs))
    members: dict[Hashable, list[int]] = {}
    for index, key in enumerate(test_sets):
        members.setdefault(key, []).append(index)
    for key, indices in members.items():
        sizes = {len(per_run[i]) for i in indices}
        if len(sizes) != 1:
            raise ValueError(f"runs of test set {key!r} hold different numbers of cases {sorted(sizes)}")
        n = sizes.pop()
        draws = rng.integers(0, n, size=(n_bootstrap, n))
        for i in indices:
            run_means[:, i] = np.asarray(per_run[i], dtype=np.float64)[draws].mean(axis=1)
    if runs > 1:
        # Resampling R runs estimates their variance with divisor R, not R - 1 (a third too small at R = 3): widen
        # each resample's run means about their mean by sqrt(R / (R - 1)), so the run level is not understated.
        centre = run_means.mean(axis=1, keepdims=True)
        run_means = centre + math.sqrt(runs / (runs - 1)) * (run_means - centre)
    picks = rng.integers(0, runs, size=(n_bootstrap, runs))
    return np.take_along_axis(run_means, picks, axis=1).mean(axis=1)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> list[float] | None:
    """Student-t interval of the mean of ``values`` (None with fewer than two)."""
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) < 2:
        return None
    half = scipy_stats.t.ppf(0.5 + confidence / 2, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr))
    return [float(arr.mean() - half), float(arr.mean() + half)]


def paired_difference(
    runs_a: Mapping[Hashable, Mapping[str, Any]],
    runs_b: Mapping[Hashable, Mapping[str, Any]],
    n_bootstrap: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean Dice difference A - B over runs, test cases and the 15 combinations, with intervals over runs and cases.

    Runs pair by name (seed, or fold and seed); within a pair the difference is taken per (case, combination) and
    averaged over the combinations of each case. The interval is :func:`hierarchical_bootstrap`'s percentile
    interval; ``t_interval`` is the t-interval over the per-run mean differences; ``per_run`` lists those.

    Args:
        runs_a: run name -> results of method A.
        runs_b: run name -> results of method B (same test cases run by run).
        n_bootstrap: bootstrap resamples.
        seed: seed of the bootstrap.

    Raises:
        ValueError: no run in common, or a pair of runs scored on different cases.
    """
    names = sorted(set(runs_a) & set(runs_b), key=str)
    if not names:
        raise ValueError(
            f"no run in common (A: {sorted(runs_a, key=str)}, B: {sorted(runs_b, key=str)}); pairing needs the same "
            "seed in common (and fold)"
        )
    per_run, test_sets, means_a, means_b = [], [], [], []
    cases_seen: set[str] = set()
    for name in names:
        cases_a, dice_a = case_by_combination_dice(runs_a[name])
        cases_b, dice_b = case_by_combination_dice(runs_b[name])
        if cases_a != cases_b:
            raise ValueError(f"run {name}: the two methods were scored on different test cases; pairing needs the same")
        per_run.append((dice_a - dice_b).mean(axis=1))  # each case: its mean over the combinations
        test_sets.append(tuple(cases_a))
        cases_seen.update(cases_a)
        means_a.append(dice_a.mean())
        means_b.append(dice_b.mean())
    run_differences = [float(d.mean()) for d in per_run]
    boot = hierarchical_bootstrap(per_run, test_sets, n_bootstrap, np.random.default_rng(seed))
    low, high = np.percentile(boot, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    num_cases = len(cases_seen)
    notes = []
    if num_cases < MIN_UNITS_FOR_P05:
        notes.append(
            f"{num_cases} test cases: no paired test over cases can reach p < 0.05 (smallest two-sided p "
            f"{2 / 2**num_cases:.4f}), whatever the interval"
        )
    if len(names) < 3:
        notes.append(f"{len(names)} run(s): the run-to-run spread is barely estimated")
    return {
        "runs": names,
        "num_runs": len(names),
        "num_test_sets": len(set(test_sets)),
        "num_cases": num_cases,
        "num_combinations": int(len(modality_combinations())),
        "mean_difference": float(np.mean(run_differences)),
        "ci95": [float(low), float(high)],
        "t_interval": t_interval(run_differences),
        "per_run": dict(zip(map(str, names), run_differences)),
        "ratio": float(np.mean(means_a) / np.mean(means_b)) if np.mean(means_b) > 0 else float("nan"),
        "bootstrap": {
            "resamples": n_bootstrap,
            "unit": "runs, then the test cases of each test set (shared by its runs; each case with all its "
            "combinations)",
            "seed": seed,
        },
        "notes": notes,
    }


__all__ = [
    "case_by_combination_dice",
    "hierarchical_bootstrap",
    "own_sequence_scores",
    "paired_difference",
    "pool_folds",
    "seed_summary",
    "split_run_name",
    "t_interval",
]
