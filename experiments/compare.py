"""Train several methods on the same federation with the same budget and compare them on all 15 combinations.

This is the command behind the results page (docs/results.md): every number there comes from a run of it.
Run it from a source checkout: ``python experiments/compare.py --workspace ... --out-dir ...``. It imports the
package; the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from typing import Any

import numpy as np
import torch

from fedbrats.constants import modality_combinations
from fedbrats.data.federation import CACHE_ENV, POOLED_SITE, default_cache_dir
from fedbrats.data.prepare import FOLDS_MANIFEST, fold_dir_name
from fedbrats.data.site_config import federation_sites_file
from fedbrats.evaluation.evaluate import default_test_datalist, evaluate_combinations, load_model, mean_over_rows
from fedbrats.evaluation.report import readable_combination, write_reports
from fedbrats.evaluation.statistics import (
    own_sequence_scores,
    paired_difference,
    pool_folds,
    seed_summary,
    split_run_name,
)
from fedbrats.federated.methods import EXPERIMENTS as METHOD_EXPERIMENTS
from fedbrats.federated.protocol import KEY_METRIC
from fedbrats.logging_setup import configure_logging
from fedbrats.runs import RunFolder
from fedbrats.scoring.postprocess import read_postprocessing
from fedbrats.simulate import SimulationResult, parse_overrides, simulate, simulated_run_dir, site_names
from fedbrats.utils import deep_merge

logger = logging.getLogger(f"fedbrats.{__name__}")

#: How the driver is run (written into each result, so that a comparison lists the commands that made it).
PROG = "python experiments/compare.py"

#: Methods and ablations: (job, training overrides, aggregation overrides), as each method's module declares them.
EXPERIMENTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = dict(METHOD_EXPERIMENTS)
#: Experiments with site-side privacy filters (see fedbrats.jobgen.job_spec), to measure their cost in Dice.
PRIVACY: dict[str, dict[str, Any]] = {
    "fedkd_dp_prototypes": {"prototypes": {"clip_norm": 1.0, "noise_multiplier": 1.0}},
    "fedavg_svt": {
        "weights": {
            "path": "nvflare.app_common.filters.svt_privacy.SVTPrivacy",
            "args": {"fraction": 0.1, "epsilon": 0.1, "noise_var": 0.1, "gamma": 1e-5, "tau": 1e-6},
        }
    },
}
EXPERIMENTS["fedkd_dp_prototypes"] = ("fedkd", {}, {})
EXPERIMENTS["fedavg_svt"] = ("fedavg", {}, {})
#: The centralized bound of FedKD's own network: FedKD's job (modality-aware network, sequence dropout) with the
#: supervised loss alone (its ``fedkd_net_only`` ablation), trained on the pooled site. A federated method is
#: compared with the centralized run of the network it trains (``centralized`` is SegResNet's).
EXPERIMENTS["centralized_fedkd_net"] = ("fedkd", EXPERIMENTS["fedkd_net_only"][1], {})
#: Experiments trained on the pooled site (``fedbrats pool-sites``, or ``fedbrats prepare --pool``), not the sites.
POOLED: frozenset[str] = frozenset({"centralized", "centralized_fedkd_net"})
#: Methods with SVD-compressed updates both ways (fedbrats.federated.compression) at fixed or rising energies, as
#: (job, filter arguments): the bytes-against-Dice curve (``python benchmarks/wire.py --from-compare`` reads the
#: bytes from their payload audits). Each is paired with its job run without compression.
COMPRESSION: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg_svd": ("fedavg", {}),  # the filters' defaults: energy 0.95 rising to 0.98 (FedKD's schedule)
    "fedavg_svd_e90": ("fedavg", {"energy_start": 0.90, "energy_end": 0.90}),
    "fedavg_svd_e80": ("fedavg", {"energy_start": 0.80, "energy_end": 0.80}),
    "fedavg_svd_e50": ("fedavg", {"energy_start": 0.50, "energy_end": 0.50}),
    # Error feedback on the uplink too: what a round's factors leave out stays at the site for the next round.
    "fedavg_svd_e50_ef": ("fedavg", {"energy_start": 0.50, "energy_end": 0.50, "error_feedback": True}),
    "fedavg_svd_e80_ef": ("fedavg", {"energy_start": 0.80, "energy_end": 0.80, "error_feedback": True}),
    # 8-bit factors (and matrices that go whole): a quarter of the bytes of float factors. Energy 1.0 sends every
    # weight whole, quantised only.
    "fedavg_q8": ("fedavg", {"energy_start": 1.0, "energy_end": 1.0, "bits": 8}),
    "fedavg_svd_q8": ("fedavg", {"bits": 8}),
    "fedavg_svd_e90_q8": ("fedavg", {"energy_start": 0.90, "energy_end": 0.90, "bits": 8}),
    "fedavg_svd_e80_q8": ("fedavg", {"energy_start": 0.80, "energy_end": 0.80, "bits": 8}),
    # 4-bit factors (two values a byte): an eighth of the bytes of float factors.
    "fedavg_svd_q4": ("fedavg", {"bits": 4}),
    # The same filter pair on the distillation methods, at its defaults.
    "fedkd_svd": ("fedkd", {}),
    "mstkd_svd": ("mstkd", {}),
    # FedKD's updates (smaller network, own sequences' encoders only) with quantised factors.
    "fedkd_svd_q8": ("fedkd", {"bits": 8}),
    "fedkd_svd_q4": ("fedkd", {"bits": 4}),
}
EXPERIMENTS.update({name: (job, {}, {}) for name, (job, _) in COMPRESSION.items()})


def compression_of(name: str) -> dict[str, Any] | None:
    """The compression filters' arguments of experiment ``name`` (None: it sends its updates uncompressed)."""
    return COMPRESSION[name][1] if name in COMPRESSION else None


def _average_results(per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per combination, the mean over sites' models (the local-only baseline has one model per site)."""
    first = next(iter(per_site.values()))
    combos = {}
    for name in first["combinations"]:
        rows = [r["combinations"][name] for r in per_site.values()]
        combos[name] = {"modalities": rows[0]["modalities"], **mean_over_rows(rows)}
        # Per case, the mean over the site models, so that local-only pairs with the other methods case by case.
        combos[name]["per_case"] = {
            metric: np.mean([row["per_case"][metric] for row in rows], axis=0).tolist() for metric in ("dice", "hd95")
        }
    out = {k: v for k, v in first.items() if k not in ("combinations", "mean_over_combinations", "full_modality")}
    out.update(
        model=f"mean of {len(per_site)} site models ({', '.join(sorted(per_site))})",
        combinations=combos,
        mean_over_combinations=mean_over_rows(list(combos.values())),
        full_modality=combos.get("t1+t1ce+t2+flair"),
    )
    return out


def portable_path(path: str, placeholders: dict[str, str]) -> str:
    """``path`` as a report shows it: a folder of ``placeholders`` (this machine's) replaced by its name (``DATA``,
    ``FOLDS``, ``$FEDBRATS_CACHE_DIR``), the home folder by ``~``; paths of this machine never enter a report."""
    full = os.path.abspath(path)
    for folder, name in sorted(placeholders.items(), key=lambda item: -len(item[0])):
        folder = os.path.abspath(folder)
        if full == folder or full.startswith(folder + os.sep):
            return name + full[len(folder) :]
    home = os.path.expanduser("~")
    return "~" + full[len(home) :] if full.startswith(home + os.sep) else os.path.basename(full)


def report_placeholders(folds: str | None, sites: str | None) -> dict[str, str]:
    """The folders a report names by placeholder: the folds' (``FOLDS``), the sites file's (``DATA``), the cache's."""
    out = {default_cache_dir(): f"${CACHE_ENV}"}
    if folds:
        out[folds] = "FOLDS"
    if sites:
        out[os.path.dirname(os.path.abspath(sites))] = "DATA"
    return out


#: The poisoning site's code (a sitecustomize module the simulator's processes import when it is on their path).
POISON_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "poison")


def enable_poisoning(workspace: str, site: str, scale: float) -> str:
    """Make ``site`` poison its updates in every simulator started from now on; return the runs' workspace.

    Raises:
        ValueError: a scale of 1 (an honest update) or not finite.
    """
    if not math.isfinite(scale) or scale == 1.0:
        raise ValueError(f"--poison-scale must be a finite factor other than 1, got {scale}")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (POISON_DIR, os.environ.get("PYTHONPATH", "")) if p)
    os.environ["FEDBRATS_POISON_SITE"] = site
    os.environ["FEDBRATS_POISON_SCALE"] = str(scale)
    logger.warning("site %s sends poisoned updates (factor %g) in every run", site, scale)
    return os.path.join(workspace, f"poisoned-{site}")


def replicate_key(seed: int, fold: int | None = None) -> int | str:
    """How a run is named in the comparison: its seed, or ``fold<k>/seed<s>`` in a cross-validation."""
    return seed if fold is None else f"fold{fold}/seed{seed}"


def fold_sites_files(folds_dir: str) -> list[str]:
    """The ``sites.json`` of every fold of a cross-validated preparation (``fedbrats prepare --folds K``).

    Raises:
        ValueError: ``folds_dir`` holds no ``folds.json``, or a fold's ``sites.json`` is missing.
    """
    manifest_path = os.path.join(folds_dir, FOLDS_MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(
            f"--folds {folds_dir!r} holds no {FOLDS_MANIFEST}; write the folds with `fedbrats prepare --folds K "
            f"--out-dir {folds_dir} ...`"
        )
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    files = [os.path.join(folds_dir, fold_dir_name(k), "sites.json") for k in range(int(manifest["folds"]))]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--folds {folds_dir!r}: fold manifest(s) {missing} are missing; prepare the folds again")
    return files


def _finished_run(workspace: str, num_rounds: int) -> SimulationResult | None:
    run_dir = simulated_run_dir(workspace)
    try:
        with open(RunFolder(run_dir).metrics, encoding="utf-8") as f:
            history = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    trained = [r for r in history if not r.get("final_validation")]
    if len(trained) != num_rounds or not history[-1].get("final_validation"):
        return None
    return SimulationResult(run_dir, float("nan"), history)


def run_experiment(
    name: str,
    workspace: str,
    sites_file: str,
    num_rounds: int,
    overrides: dict[str, Any],
    eval_data: dict[str, Any],
    test_datalist: str,
    max_cases: int = 0,
    reuse: bool = False,
    overlap: float = 0.5,
    seed: int = 0,
    network_args: dict[str, Any] | None = None,
    device: str = "cpu",
    fold: int | None = None,
) -> dict[str, Any]:
    """Simulate one method with one seed and evaluate its best global model (every site model for local-only).

    The "best" model is the one with the best validation Dice during training; the test cases are touched only
    here, once per run. The run lives in ``workspace/<name>/seed<seed>`` (``workspace/<name>/fold<k>/seed<seed>``
    in fold ``k`` of a cross-validation). With ``reuse``, a finished run there (same rounds) is evaluated again
    instead of being retrained. The experiments of :data:`POOLED` train on the pooled site only.
    """
    job, job_overrides, agg_overrides = EXPERIMENTS[name]
    run_workspace = run_folder(workspace, name, seed, fold)
    result = _finished_run(run_workspace, num_rounds) if reuse else None
    if result is not None:
        logger.info("%s: reusing the finished run %s", name, result.run_dir)
    else:
        result = simulate(
            job,
            run_workspace,
            seed=seed,
            network_args=network_args,
            sites_file=sites_file,
            num_rounds=num_rounds,
            training=deep_merge(overrides, job_overrides),
            aggregation_args=agg_overrides,
            privacy=PRIVACY.get(name),
            compression=compression_of(name),
            clients=[POOLED_SITE] if name in POOLED else None,
        )
    run = RunFolder(result.run_dir)
    spec = run.model_spec
    # Chosen on the sites' validation cases at the end of training; the test cases only see the result.
    postprocessing = read_postprocessing(result.run_dir)
    if job == "local_only":
        site_dir = run.site_models
        per_site = {}
        for fname in sorted(os.listdir(site_dir)):
            model = load_model(os.path.join(site_dir, fname), spec)
            per_site[fname[:-3]] = evaluate_combinations(
                model,
                test_datalist,
                data=eval_data,
                overlap=overlap,
                max_cases=max_cases,
                model_name=f"local {fname[:-3]}",
                min_component_voxels=postprocessing,
                device=device,
            )
        results = _average_results(per_site)
        results["per_site"] = {s: r["mean_over_combinations"] for s, r in per_site.items()}
        # Each site's own model, for scoring every site on its own sequences (full results, per case).
        results["site_results"] = per_site
    else:
        model = load_model(result.best_model, spec)
        results = evaluate_combinations(
            model,
            test_datalist,
            data=eval_data,
            overlap=overlap,
            max_cases=max_cases,
            model_name=name,
            min_component_voxels=postprocessing,
            device=device,
        )
    results["training"] = {
        "job": job,
        "seed": seed,
        "fold": fold,
        "sites": sites_file,
        "network_args": network_args or {},
        "rounds": num_rounds,
        "overrides": deep_merge(overrides, job_overrides),
        "aggregation_overrides": agg_overrides,
        "privacy": PRIVACY.get(name),
        "compression": compression_of(name),
        "poison": {"site": os.environ["FEDBRATS_POISON_SITE"], "scale": float(os.environ["FEDBRATS_POISON_SCALE"])}
        if os.environ.get("FEDBRATS_POISON_SITE")
        else None,
        "simulator_seconds": round(result.seconds, 1) if result.seconds == result.seconds else None,
        "final_val_mean_dice": (result.history[-1].get("aggregated") or {}).get(KEY_METRIC),
    }
    return results


def run_folder(workspace: str, name: str, seed: int, fold: int | None = None) -> str:
    """Where experiment ``name`` with ``seed`` (in fold ``fold``) is trained and its full (per-case) results are
    kept."""
    return os.path.join(workspace, name, *([] if fold is None else [fold_dir_name(fold)]), f"seed{seed}")


#: Paired comparisons the report makes (A vs B), where both were run.
PAIRS: tuple[tuple[str, str], ...] = (
    ("fedkd", "fedavg"),
    ("fedkd", "fedkd_net_only"),
    ("fedkd_no_rcl", "fedkd"),
    ("fedkd_no_kd", "fedkd"),
    ("fedkd_net_only", "fedavg"),
    ("mstkd", "fedavg"),
    ("mstkd", "mstkd_net_only"),
    ("fedavg", "local_only"),
    ("fedavg_median", "fedavg"),
    ("fedavg_trimmed_mean", "fedavg"),
    ("fedavg_clipped", "fedavg"),
    ("fedkd", "local_only"),
    ("fedavg", "centralized"),
    ("fedkd", "centralized"),
    ("fedkd", "centralized_fedkd_net"),
    ("fedkd_net_only", "centralized_fedkd_net"),
    ("centralized_fedkd_net", "centralized"),
    ("mstkd", "centralized"),
    ("local_only", "centralized"),
    ("fedmic", "fedavg"),
    ("fedmic_unbounded_kd", "fedmic"),
    ("fedmic_ramp_kd", "fedmic"),
    ("fedmic_constant_personal_lr", "fedmic"),
    *((name, job) for name, (job, _) in COMPRESSION.items()),
    ("isofed", "isofed_labelled_only"),
    ("isofed", "isofed_naive_ssl"),
    ("isofed_no_im", "isofed"),
    ("isofed_slow_unlabelled", "isofed"),
    ("isofed_handoff_alternate", "isofed"),
    ("isofed_no_handoff", "isofed"),
    ("isofed_labelled_only", "fedavg"),
    ("isofed", "fedavg"),
)


def _pm(stat: dict[str, float] | None, digits: int = 3, runs: int = 2) -> str:
    if not stat:
        return "n/a"
    if runs < 2:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def comparison_summary(
    runs: dict[str, dict[Any, dict[str, Any]]],
    site_modalities: dict[str, list[str]] | None = None,
    min_site_cases: int = 1,
) -> dict[str, Any]:
    """Per method the summary over seeds of its results pooled over the folds (:func:`pool_folds`), with each
    site's Dice on its own sequences where the test cases name their sites; and the paired differences of
    :data:`PAIRS` (where both were run), over runs and cases.

    A site with fewer than ``min_site_cases`` test cases keeps its case count but no scores (``withheld``): for
    real patients' data (``--aggregate-only``) a site's mean over one case would be that patient's score.
    """
    summary = {}
    for name, by_run in runs.items():
        if not by_run:
            continue
        pooled = pool_folds(by_run)
        if site_modalities:
            for results in pooled.values():
                results["own_sequences"] = own_sequence_scores(results, site_modalities)
        if not pooled:
            continue
        # "seeds": what the cells summarise (per seed, every fold pooled); "runs": every (fold, seed) run.
        summary[name] = {**seed_summary(pooled), "seeds": sorted(pooled, key=str), "runs": sorted(by_run, key=str)}
        for site, scores in (summary[name].get("own_sequences") or {}).items():
            if scores.get("num_cases", 0) < min_site_cases:
                summary[name]["own_sequences"][site] = {
                    "modalities": scores.get("modalities"),
                    "num_cases": scores.get("num_cases", 0),
                    "withheld": f"fewer than {min_site_cases} test cases: a mean over them would be a case's score",
                }
    pairs = {}
    for a, b in PAIRS:
        if runs.get(a) and runs.get(b) and set(runs[a]) & set(runs[b]):
            pairs[f"{a} vs {b}"] = paired_difference(runs[a], runs[b])
    return {"methods": summary, "paired": pairs}


def _interval(bounds: list[float] | None) -> str:
    return "n/a" if not bounds else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def write_comparison(
    out_dir: str,
    sites_file: str,
    runs: dict[str, dict[Any, dict[str, Any]]],
    commands: list[str],
    site_modalities: dict[str, list[str]] | None = None,
    min_site_cases: int = 1,
) -> str:
    """Write ``comparison.md`` and ``comparison.json`` (summaries over seeds, paired intervals); return the .md.

    Args:
        out_dir: where the report goes.
        sites_file: the federation (named in the report).
        runs: method -> run name (seed, or ``fold<k>/seed<s>``) -> full results (with per-case values).
        commands: the commands that produced the runs.
        site_modalities: each site's sequences, for the per-site scores on their own sequences.
        min_site_cases: see :func:`comparison_summary`.
    """
    ordered = {name: runs[name] for name in EXPERIMENTS if runs.get(name)}
    summary = comparison_summary(ordered, site_modalities, min_site_cases)
    with open(os.path.join(out_dir, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump({"sites": sites_file, "commands": commands, **summary}, f, indent=2)
    methods = summary["methods"]
    folds = sorted({fold for by_run in ordered.values() for n in by_run if (fold := split_run_name(n)[0])})
    cases = sorted({_num_cases(ordered[name]) for name in methods})
    lines = ["Produced by:", "", *[f"- `{c}`" for c in commands], "", f"sites: `{sites_file}`", ""]
    if folds:
        lines += [
            f"Cross-validation: {len(folds)} folds; test cases pooled over the folds: {', '.join(map(str, cases))}. "
            "Each cell: per seed, the result over all folds' test cases (every case scored once, by the run of its "
            "fold); mean ± standard deviation over seeds where a method has more than one. Dice higher is better, "
            "HD95 (mm) lower.",
            "",
        ]
    else:
        lines += [
            f"Test cases: {', '.join(map(str, cases))}. Each cell: mean ± standard deviation over seeds (the runs' "
            "seeds fix the initial model, data order, crops, augmentation and sequence dropout). Dice higher is "
            "better, HD95 (mm) lower.",
            "",
        ]
    for part, title in (
        ("mean_over_combinations", "Mean over the 15 sequence combinations"),
        ("full_modality", "All four sequences"),
    ):
        # The test cases of each method's runs: a method run on fewer folds is scored on fewer cases.
        lines += [f"### {title}", "", "| Method | runs | cases | Dice WT | Dice TC | Dice ET | Dice mean | HD95 mean |"]
        lines.append("|---|--:|--:|--:|--:|--:|--:|--:|")
        for name, m in methods.items():
            row = m.get(part)
            if not row:
                continue
            n = len(m["seeds"])
            cells = [_pm(row["dice"][r], runs=n) for r in ("WT", "TC", "ET")]
            cells += [_pm(row["mean_dice"], runs=n), _pm(row["mean_hd95"], 1, runs=n)]
            lines.append(f"| {name} | {len(m['runs'])} | {_num_cases(ordered[name])} | " + " | ".join(cells) + " |")
        lines.append("")
    own_sites = sorted({site for m in methods.values() for site in m.get("own_sequences", {})})
    if own_sites:
        first = next(m["own_sequences"] for m in methods.values() if m.get("own_sequences"))
        headers = [f"{site} ({'+'.join(first[site]['modalities'])})" for site in own_sites if site in first]
        lines += [
            "### Each site on its own sequences",
            "",
            "Mean Dice (WT/TC/ET) of each site's test cases with the sequences the site has (the client metric of "
            "FedMEMA and FedMEPD), with the number of the site's cases each method's runs scored.",
            "",
            "| Method | " + " | ".join(headers) + " |",
            "|---|" + "|".join(["--:"] * len(headers)) + "|",
        ]
        for name, m in methods.items():
            own = m.get("own_sequences") or {}
            n = len(m["seeds"])
            lines.append(
                f"| {name} | "
                + " | ".join(
                    "withheld (one case)"
                    if own.get(s, {}).get("withheld")
                    else f"{_pm(own.get(s, {}).get('mean_dice'), runs=n)} ({own.get(s, {}).get('num_cases', '?')})"
                    for s in own_sites
                )
                + " |"
            )
        lines.append("")
    if summary["paired"]:
        lines += [
            "### Paired differences (A - B)",
            "",
            "Mean Dice difference over runs, test cases and the 15 combinations, runs paired by "
            + ("fold and seed" if folds else "seed")
            + ". 95 % interval: a two-level bootstrap (10,000 resamples of the runs, and of the test cases of each "
            "test set, shared by its runs; a case with all its combinations); t-interval: over the per-run mean "
            "differences (runs as replicates); per run: each pair's difference; ratio of the 15-combination mean "
            "Dice A / B.",
            "",
            "| A vs B | runs | cases | mean difference | 95 % interval | t-interval | per run | ratio A/B |",
            "|---|--:|--:|--:|--:|--:|---|--:|",
        ]
        notes = []
        for pair, d in summary["paired"].items():
            per_run = " / ".join(f"{v:+.3f}" for v in d["per_run"].values())
            lines.append(
                f"| {pair} | {d['num_runs']} | {d['num_cases']} | {d['mean_difference']:+.3f} | "
                f"{_interval(d['ci95'])} | {_interval(d['t_interval'])} | {per_run} | {d['ratio']:.2f} |"
            )
            notes += [f"{pair}: {note}" for note in d.get("notes", [])]
        lines.append("")
        if notes:
            lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    names = list(methods)
    lines += ["### Mean Dice per sequence combination", "", "| Sequences | " + " | ".join(names) + " |"]
    lines.append("|---|" + "|".join(["--:"] * len(names)) + "|")
    for combo in modality_combinations():
        key = "+".join(combo)
        cells = [_pm(methods[n]["combinations"].get(key), runs=len(methods[n]["seeds"])) for n in names]
        lines.append(f"| {readable_combination(combo)} | " + " | ".join(cells) + " |")
    path = os.path.join(out_dir, "comparison.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _name_case_sites(runs: dict[str, dict[Any, dict[str, Any]]], test_datalists: list[str]) -> None:
    """Give results scored before test cases named their site (``case_sites``) the sites the test datalists name
    now, where every case of the run is found there."""
    site_of: dict[str, str] = {}
    for path in test_datalists:
        with open(path, encoding="utf-8") as f:
            site_of.update({str(e.get("case_id")): e["site"] for e in json.load(f).get("test", []) if e.get("site")})
    for by_run in runs.values():
        for results in by_run.values():
            cases = [str(c) for c in results.get("cases") or []]
            if not results.get("case_sites") and cases and all(c in site_of for c in cases):
                results["case_sites"] = [site_of[c] for c in cases]


def _site_modalities(sites_file: str) -> dict[str, list[str]]:
    """Each site's sequences (the pooled site left out), from a ``sites.json``."""
    with open(sites_file, encoding="utf-8") as f:
        sites = json.load(f)["sites"]
    return {name: list(entry["modalities"]) for name, entry in sites.items() if name != POOLED_SITE}


def _num_cases(by_run: dict[Any, dict[str, Any]]) -> int:
    """Distinct test cases a method's runs were scored on (all folds together)."""
    cases = {str(c) for r in by_run.values() for c in (r.get("cases") or [])}
    return len(cases) or max(int(r.get("num_cases", 0)) for r in by_run.values())


def _saved_runs(
    workspace: str, names: list[str], seeds: list[int], folds: list[int | None] | None = None
) -> dict[str, dict[int | str, dict[str, Any]]]:
    """Full results of finished evaluations in the workspace (``<name>[/fold<f>]/seed<k>/results.json``), by
    :func:`replicate_key`."""
    runs: dict[str, dict[int | str, dict[str, Any]]] = {}
    for name in names:
        for fold in folds or [None]:
            for seed in seeds:
                path = os.path.join(run_folder(workspace, name, seed, fold), "results.json")
                if os.path.isfile(path):
                    with open(path, encoding="utf-8") as f:
                        runs.setdefault(name, {})[replicate_key(seed, fold)] = json.load(f)
    return runs


def copy_cross_site_reports(
    workspace: str, out_dir: str, names: list[str], seeds: list[int], folds: list[int | None] | None = None
) -> list[str]:
    """The federated (cross-site) evaluation of each run that had one, as its report (matrix, heatmap, summary: site
    aggregates only) in ``out_dir/<name>[/fold<f>]/seed<k>/cross_site/``; returns the folders written."""
    from fedbrats.federated.server.cross_site_report import write_cross_site_report

    written = []
    for name in names:
        for fold in folds or [None]:
            for seed in seeds:
                run_dir = simulated_run_dir(run_folder(workspace, name, seed, fold))
                if not os.path.isfile(RunFolder(run_dir).cross_site_results):
                    continue
                out = os.path.join(out_dir, name, *([] if fold is None else [fold_dir_name(fold)]), f"seed{seed}")
                write_cross_site_report(run_dir, out_dir=os.path.join(out, "cross_site"))
                written.append(os.path.join(out, "cross_site"))
    return written


def _without_per_case(results: dict[str, Any]) -> dict[str, Any]:
    out = dict(results)
    out["combinations"] = {
        k: {kk: vv for kk, vv in row.items() if kk != "per_case"} for k, row in results["combinations"].items()
    }
    for part in ("full_modality",):
        if out.get(part):
            out[part] = {k: v for k, v in out[part].items() if k != "per_case"}
    out.pop("cases", None)
    out.pop("case_sites", None)
    out.pop("site_results", None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument(
        "--sites", default=None, help="sites.json (default: $FEDBRATS_SITE_CONFIG, else the embedded federation)"
    )
    p.add_argument(
        "--folds",
        default=None,
        metavar="DIR",
        help="a cross-validated preparation (`fedbrats prepare --folds K --pool --out-dir DIR`): every experiment "
        "and seed runs on every fold, and the comparison pools the folds' test cases (a run is a fold and a seed)",
    )
    p.add_argument(
        "--only-folds", default=None, help="with --folds: train and score these folds only (comma-separated)"
    )
    p.add_argument("--workspace", required=True, help="where runs and their full (per-case) results are kept")
    p.add_argument("--out-dir", required=True, help="where the reports go")
    p.add_argument("--experiments", default="centralized,local_only,fedavg,fedkd", help=f"of {sorted(EXPERIMENTS)}")
    p.add_argument(
        "--seeds",
        default="0,1,2",
        help="seeds of the replicated runs (comma-separated; at least 3 runs in all, seeds x folds)",
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training override for all")
    p.add_argument("--net", action="append", default=[], metavar="KEY=VALUE", help="network argument for all")
    p.add_argument("--max-cases", type=int, default=0)
    p.add_argument(
        "--eval-roi",
        type=int,
        nargs=3,
        default=None,
        help="sliding window of the evaluation (default, and recommended: the training crop; another size changes "
        "what the networks' normalisation sees)",
    )
    p.add_argument("--eval-overlap", type=float, default=0.5, help="sliding-window overlap of the evaluation")
    p.add_argument(
        "--eval-device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device of the evaluation (float32 either way; training picks its own, see the job's 'device')",
    )
    p.add_argument("--reuse", action="store_true", help="evaluate finished runs in the workspace again, no retraining")
    p.add_argument(
        "--poison",
        default=None,
        metavar="SITE",
        help="SITE sends a poisoned update every round (experiments/poison: its update reversed and boosted, every "
        "other item honest); the runs go to WORKSPACE/poisoned-SITE",
    )
    p.add_argument("--poison-scale", type=float, default=-10.0, help="the poisoned update's factor (default -10)")
    p.add_argument(
        "--report-only", action="store_true", help="only rewrite the comparison from the results in the workspace"
    )
    p.add_argument(
        "--aggregate-only",
        action="store_true",
        help="reports in out-dir keep no per-case values or case ids (for real patients' data)",
    )
    a = p.parse_args(argv)
    configure_logging("INFO")
    names = a.experiments.split(",")
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; choose from {sorted(EXPERIMENTS)}")
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if a.folds and a.sites:
        raise ValueError("--folds and --sites exclude each other: each fold has its own sites.json")
    if a.folds:
        fold_files = fold_sites_files(a.folds)
        folds: list[int | None] = list(range(len(fold_files)))
        sites_of_fold: dict[int | None, str] = dict(zip(folds, fold_files))
    else:
        folds = [None]
        sites_of_fold = {None: federation_sites_file(a.sites, "compare")}
    if a.only_folds:
        if not a.folds:
            raise ValueError("--only-folds needs --folds")
        wanted = {int(x) for x in a.only_folds.split(",") if x.strip()}
        if not wanted <= set(folds):
            raise ValueError(f"--only-folds {sorted(wanted)}: the preparation has folds {folds}")
        train_folds = [f for f in folds if f in wanted]
    else:
        train_folds = folds
    if len(seeds) * len(folds) < 3:
        logger.warning("only %d run(s) per method: a comparison needs at least 3", len(seeds) * len(folds))
    for sites_file in sites_of_fold.values():
        default_test_datalist(sites_file, "compare's test set")  # a fold without a test set fails before any run
        if POOLED & set(names):
            site_names(sites_file, "centralized")  # and a federation without the pooled site
    overrides = parse_overrides(a.set)
    from fedbrats.jobgen import BASE_TRAINING

    eval_data = deep_merge(BASE_TRAINING["data"], overrides.get("data", {}))
    eval_data = {k: v for k, v in eval_data.items() if k in ("roi_size", "zoom", "max_eval_size")}
    if a.eval_roi:
        if list(a.eval_roi) != list(eval_data["roi_size"]):
            # Fully convolutional, but normalised over the window (GroupNorm/InstanceNorm): a window of another size
            # than the training crop changes every layer's statistics (measured: docs/results.md, real data).
            logger.warning(
                "--eval-roi %s differs from the training crop %s: the models normalise over the window, so this "
                "usually lowers their Dice",
                list(a.eval_roi),
                list(eval_data["roi_size"]),
            )
        eval_data["roi_size"] = list(a.eval_roi)
    os.makedirs(a.out_dir, exist_ok=True)
    placeholders = report_placeholders(a.folds, a.sites)
    if a.poison:
        a.workspace = enable_poisoning(a.workspace, a.poison, a.poison_scale)
    command = PROG + " " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    for name in [] if a.report_only else names:
        for fold in train_folds:
            sites_file = sites_of_fold[fold]
            for seed in seeds:
                label = f"{name} " + ("" if fold is None else f"fold {fold} ") + f"seed {seed}"
                started = time.monotonic()
                results = run_experiment(
                    name,
                    a.workspace,
                    sites_file,
                    a.rounds,
                    overrides,
                    eval_data,
                    default_test_datalist(sites_file, "compare's test set"),
                    a.max_cases,
                    reuse=a.reuse,
                    overlap=a.eval_overlap,
                    seed=seed,
                    network_args=parse_overrides(a.net),
                    device=a.eval_device,
                    fold=fold,
                )
                results["total_seconds"] = round(time.monotonic() - started, 1)
                results["command"] = command
                results["datalist"] = portable_path(results["datalist"], placeholders)
                results["training"]["sites"] = portable_path(results["training"]["sites"], placeholders)
                # Full results (per case) stay in the workspace; the report folder may get aggregates only.
                write_reports(results, run_folder(a.workspace, name, seed, fold), label=label)
                shown = _without_per_case(results) if a.aggregate_only else results
                out = os.path.join(a.out_dir, name, *([] if fold is None else [fold_dir_name(fold)]), f"seed{seed}")
                write_reports(shown, out, label=label)
                logger.info(
                    "%s: mean Dice over %d combinations %.4f",
                    label,
                    len(modality_combinations()),
                    results["mean_over_combinations"]["mean_dice"],
                )
    runs = _saved_runs(a.workspace, names, seeds, folds)
    for folder in copy_cross_site_reports(a.workspace, a.out_dir, names, seeds, folds):
        logger.info("federated (cross-site) evaluation: %s", folder)
    _name_case_sites(runs, [default_test_datalist(f, "compare's test set") for f in sites_of_fold.values()])
    commands = sorted({r.get("command", "") for by_seed in runs.values() for r in by_seed.values()} - {""})
    if a.report_only:
        commands.append(f"{command} (this report, from the runs' saved results)")
    shown_sites = portable_path(os.path.join(a.folds, FOLDS_MANIFEST) if a.folds else sites_of_fold[None], placeholders)
    path = write_comparison(
        a.out_dir,
        shown_sites,
        runs,
        commands,
        _site_modalities(next(iter(sites_of_fold.values()))),
        # Real patients: no site score that is one case's score.
        min_site_cases=2 if a.aggregate_only else 1,
    )
    logger.info("comparison written to %s", path)
    return 0


def run(argv: list[str] | None = None) -> int:
    """The command line: :func:`main`, with a usage error (bad option value, missing file) logged, exit status 1."""
    try:
        return main(argv)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(run())
