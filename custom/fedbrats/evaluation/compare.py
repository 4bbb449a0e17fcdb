"""Train several methods on the same federation with the same budget and compare them on all 15 combinations.

This is the command behind the results page (docs/results.md): every number there comes from a run of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from typing import Any

from fedbrats.constants import modality_combinations
from fedbrats.data.site_config import federation_sites_file
from fedbrats.evaluation.evaluate import default_test_datalist, evaluate_combinations, load_model, mean_over_rows
from fedbrats.evaluation.report import compare_table, write_reports
from fedbrats.federated.simulate import SimulationResult, parse_overrides, simulate
from fedbrats.logging_setup import configure_logging

logger = logging.getLogger(__name__)

#: Methods and ablations: (job, training overrides, aggregation overrides).
EXPERIMENTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "centralized": ("centralized", {}, {}),
    "local_only": ("local_only", {}, {}),
    "fedavg": ("fedavg", {}, {}),
    "fedkd": ("fedkd", {}, {}),
    "fedkd_no_drl": ("fedkd", {"method_args": {"drl_weight": 0.0}}, {}),
    "fedkd_no_rcl": ("fedkd", {"method_args": {"rcl_weight": 0.0}}, {}),
    "fedkd_no_kd": (
        "fedkd",
        {"method_args": {"kd_weight": 0.0, "proto_kd_weight": 0.0, "self_distill_weight": 0.0}},
        {},
    ),
    # Plain FedAvg needs every weight from every site, so sites send the encoders of absent sequences too.
    "fedkd_no_modality_aware_agg": (
        "fedkd",
        {"method_args": {"partial_updates": False}},
        {"modality_aware": False},
    ),
    "mstkd": ("mstkd", {}, {}),
    "mstkd_no_transformer_kd": ("mstkd", {"method_args": {"hidden_kd_weight": 0.0, "attn_kd_weight": 0.0}}, {}),
    "mstkd_no_logit_kd": ("mstkd", {"method_args": {"logit_kd_weight": 0.0, "consistency_weight": 0.0}}, {}),
    "mstkd_no_style": ("mstkd", {"method_args": {"gram_weight": 0.0, "adv_weight": 0.0}}, {}),
}
#: Experiments with site-side privacy filters (see fedbrats.jobgen.job_configs), to measure their cost in Dice.
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


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _average_results(per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per combination, the mean over sites' models (the local-only baseline has one model per site)."""
    first = next(iter(per_site.values()))
    combos = {}
    for name in first["combinations"]:
        rows = [r["combinations"][name] for r in per_site.values()]
        combos[name] = {"modalities": rows[0]["modalities"], **mean_over_rows(rows)}
    out = {k: v for k, v in first.items() if k not in ("combinations", "mean_over_combinations", "full_modality")}
    out.update(
        model=f"mean of {len(per_site)} site models ({', '.join(sorted(per_site))})",
        combinations=combos,
        mean_over_combinations=mean_over_rows(list(combos.values())),
        full_modality=combos.get("t1+t1ce+t2+flair"),
    )
    return out


def _finished_run(workspace: str, num_rounds: int) -> SimulationResult | None:
    run_dir = os.path.join(workspace, "sim", "server", "simulate_job")
    try:
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
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
) -> dict[str, Any]:
    """Simulate one method and evaluate its best global model (every site model for local-only).

    With ``reuse``, a finished run of the same experiment in ``workspace`` (same rounds) is evaluated again
    instead of being retrained.
    """
    job, job_overrides, agg_overrides = EXPERIMENTS[name]
    result = _finished_run(os.path.join(workspace, name), num_rounds) if reuse else None
    if result is not None:
        logger.info("%s: reusing the finished run %s", name, result.run_dir)
    else:
        result = simulate(
            job,
            os.path.join(workspace, name),
            sites_file=sites_file,
            num_rounds=num_rounds,
            overrides=_merge(overrides, job_overrides),
            aggregation_args=agg_overrides,
            privacy=PRIVACY.get(name),
        )
    spec = os.path.join(result.run_dir, "model_spec.json")
    if job == "local_only":
        site_dir = os.path.join(result.run_dir, "site_models")
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
            )
        results = _average_results(per_site)
        results["per_site"] = {s: r["mean_over_combinations"] for s, r in per_site.items()}
    else:
        model = load_model(result.best_model, spec)
        results = evaluate_combinations(
            model, test_datalist, data=eval_data, overlap=overlap, max_cases=max_cases, model_name=name
        )
    results["training"] = {
        "job": job,
        "rounds": num_rounds,
        "overrides": _merge(overrides, job_overrides),
        "aggregation_overrides": agg_overrides,
        "privacy": PRIVACY.get(name),
        "simulator_seconds": round(result.seconds, 1) if result.seconds == result.seconds else None,
        "final_val_mean_dice": (result.history[-1].get("aggregated") or {}).get("val_mean_dice"),
    }
    return results


def write_comparison(out_dir: str, sites_file: str, results: dict[str, dict[str, Any]] | None = None) -> str:
    """Write ``comparison.md`` over every method reported in ``out_dir`` (this run's or an earlier one's), each
    with the command that produced it; return its path."""
    all_results = dict(results or {})
    # The comparison covers every method reported in out_dir, from this run or an earlier one, each with the
    # command that produced it.
    for name in EXPERIMENTS:
        path = os.path.join(out_dir, name, "results.json")
        if name not in all_results and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                all_results[name] = json.load(f)
    ordered = {name: all_results[name] for name in EXPERIMENTS if name in all_results}
    commands = sorted({r.get("command", "") for r in ordered.values() if r.get("command")})
    path = os.path.join(out_dir, "comparison.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("Produced by:\n\n" + "".join(f"- `{c}`\n" for c in commands) + f"\nsites: `{sites_file}`\n\n")
        f.write(compare_table(ordered))
        f.write("\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedbrats compare", description=__doc__)
    p.add_argument(
        "--sites", default=None, help="sites.json (default: $FEDBRATS_SITE_CONFIG, else the embedded federation)"
    )
    p.add_argument("--workspace", required=True, help="where runs are kept")
    p.add_argument("--out-dir", required=True, help="where the reports go")
    p.add_argument("--experiments", default="centralized,local_only,fedavg,fedkd", help=f"of {sorted(EXPERIMENTS)}")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training override for all")
    p.add_argument("--max-cases", type=int, default=0)
    p.add_argument(
        "--eval-roi", type=int, nargs=3, default=None, help="sliding window of the evaluation (default: training crop)"
    )
    p.add_argument("--eval-overlap", type=float, default=0.5, help="sliding-window overlap of the evaluation")
    p.add_argument("--reuse", action="store_true", help="evaluate finished runs in the workspace again, no retraining")
    p.add_argument("--report-only", action="store_true", help="only rewrite comparison.md from the results in out-dir")
    a = p.parse_args(argv)
    configure_logging("INFO")
    sites_file = federation_sites_file(a.sites, "compare")
    test_datalist = default_test_datalist(sites_file, "compare's test set")
    overrides = parse_overrides(a.set)
    from fedbrats.jobgen import BASE_TRAINING

    eval_data = _merge(BASE_TRAINING["data"], overrides.get("data", {}))
    eval_data = {k: v for k, v in eval_data.items() if k in ("roi_size", "zoom", "max_eval_size")}
    if a.eval_roi:
        # The networks are fully convolutional: a window larger than the training crop needs far fewer passes.
        eval_data["roi_size"] = list(a.eval_roi)
    os.makedirs(a.out_dir, exist_ok=True)
    command = "fedbrats compare " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[2:]))
    all_results: dict[str, dict[str, Any]] = {}
    for name in [] if a.report_only else a.experiments.split(","):
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
        started = time.monotonic()
        results = run_experiment(
            name,
            a.workspace,
            sites_file,
            a.rounds,
            overrides,
            eval_data,
            test_datalist,
            a.max_cases,
            reuse=a.reuse,
            overlap=a.eval_overlap,
        )
        results["total_seconds"] = round(time.monotonic() - started, 1)
        results["command"] = command
        write_reports(results, os.path.join(a.out_dir, name), label=name)
        all_results[name] = results
        logger.info(
            "%s: mean Dice over %d combinations %.4f",
            name,
            len(modality_combinations()),
            results["mean_over_combinations"]["mean_dice"],
        )
    write_comparison(a.out_dir, sites_file, all_results)
    return 0
