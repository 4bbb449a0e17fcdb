"""MMCCD and its baselines, federated, centralized and each site alone, scored on the same test slices.

``python experiments/mmccd_compare.py --sites DATA/sites.json --workspace W --out-dir OUT`` trains every
(variant, mode, seed) with jobs/mmccd in the simulator and scores its best global model with
:func:`fedbrats.evaluation.anomaly.evaluate_anomaly` (threshold chosen on the pooled site's validation cases, test
slices scored once). Variants: ``mmccd``, ``cyclic_unet``, ``autoencoder``; modes: ``federated`` (every site but
the pooled one), ``centralized`` (the pooled site), ``local`` (each site alone; its row averages the sites).
Finished runs are reused (the driver can be stopped and run again). The brain mask of every scored slice is eroded
by a disk of ``--erosion-disk-radius`` pixels (default 4, the public code's ``disk(4)``); each run's
``results.json`` records its scoring options and the report says which erosion its rows were scored with.
``--rescore`` scores the finished runs of the chosen rows again with the current scoring options, without training
(the ``results.json`` before the first rescore is kept as ``results.previous.json``); a run that was never trained
is refused. It imports the package; the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import Any

import numpy as np

from fedbrats.data.federation import POOLED_SITE
from fedbrats.data.site_config import federation_sites_file
from fedbrats.evaluation.anomaly import evaluate_anomaly
from fedbrats.evaluation.evaluate import load_model
from fedbrats.federated.methods.mmccd import EROSION_DISK_RADIUS, VARIANTS, check_erosion_disk_radius
from fedbrats.logging_setup import configure_logging
from fedbrats.runs import RunFolder
from fedbrats.simulate import parse_overrides, simulate, simulated_run_dir

logger = logging.getLogger(f"fedbrats.{__name__}")

PROG = "python experiments/mmccd_compare.py"
MODES = ("federated", "centralized", "local")
METRICS = ("auroc", "auprc", "dice", "dice_best_threshold_on_these_slices_optimistic")
#: How results written before the disk erosion were scored: ``ndimage.binary_erosion(iterations=2)`` per slice.
OLD_EROSION = "2 iterations of the 3x3 cross (before disk erosion)"
#: A finished run's earlier results, kept when ``--rescore`` replaces them.
PREVIOUS_RESULTS = "results.previous.json"


def erosion_of(results: dict[str, Any]) -> str:
    """How a run's brain masks were eroded when it was scored: ``disk(r)``, the old iterations, or ``unknown``."""
    options = results.get("options")
    if options is None:
        return "unknown"
    if "erosion_disk_radius" not in options:
        return OLD_EROSION
    return f"disk({options['erosion_disk_radius']})"


def _sites(sites_file: str) -> tuple[list[str], str, str]:
    """The federation's sites (without the pooled one), its test datalist and the pooled site's datalist."""
    with open(sites_file, encoding="utf-8") as f:
        manifest = json.load(f)
    base = os.path.dirname(os.path.abspath(sites_file))
    sites = manifest["sites"]
    if POOLED_SITE not in sites:
        raise ValueError(f"{sites_file} has no {POOLED_SITE!r} site; run `fedbrats pool-sites {sites_file}`")
    pooled = os.path.join(base, sites[POOLED_SITE]["datalist"])
    return sorted(s for s in sites if s != POOLED_SITE), os.path.join(base, manifest["test_datalist"]), pooled


def run_one(
    workspace: str,
    variant: str,
    clients: list[str],
    seed: int,
    args: argparse.Namespace,
    sites_file: str,
    test_list: str,
    val_list: str,
) -> dict[str, Any]:
    """Train (or reuse) one run and score it; the result is kept in ``workspace/results.json``.

    With ``args.rescore`` a finished run is scored again (never trained) and its earlier results are kept as
    :data:`PREVIOUS_RESULTS` (those before the first rescore); a run that was never trained is refused.
    """
    done = os.path.join(workspace, "results.json")
    previous = None
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            previous = json.load(f)
    if args.rescore:
        return rescore_one(workspace, args, test_list, val_list, previous)
    if previous is not None:
        wanted = f"disk({args.erosion_disk_radius})"
        if erosion_of(previous) != wanted:
            logger.warning(
                "%s was scored with brain-mask erosion %s, not %s: reused as it is (--rescore scores it again)",
                done,
                erosion_of(previous),
                wanted,
            )
        return previous
    network_args = {**parse_overrides(args.net), "variant": variant}
    result = simulate(
        "mmccd",
        workspace,
        sites_file=sites_file,
        num_rounds=args.rounds,
        training=parse_overrides(args.set),
        clients=clients,
        seed=seed,
        network_args=network_args,
    )
    results, checkpoint = score_run(result.run_dir, args, test_list, val_list)
    results["training"] = {
        "clients": clients,
        "seed": seed,
        "rounds": args.rounds,
        "network_args": network_args,
        "overrides": parse_overrides(args.set),
        "simulator_seconds": round(result.seconds, 1),
        "checkpoint": os.path.basename(checkpoint),
    }
    with open(done, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def score_run(run_dir: str, args: argparse.Namespace, test_list: str, val_list: str) -> tuple[dict[str, Any], str]:
    """Score the best global model of a finished run (its last when none was kept) with the driver's options."""
    run = RunFolder(run_dir)
    checkpoint = run.best_global_model if os.path.isfile(run.best_global_model) else run.global_model
    if not os.path.isfile(checkpoint):
        raise ValueError(f"{run_dir}: no global model to score (was the run trained?)")
    model = load_model(checkpoint, run.model_spec)
    results = evaluate_anomaly(
        model,
        test_list,
        val_list,
        zoom=args.zoom,
        num_masks=args.masks,
        steps=args.steps,
        brain_fraction=args.brain_fraction,
        erosion_disk_radius=args.erosion_disk_radius,
        device="cpu",
    )
    return results, checkpoint


def rescore_one(
    workspace: str, args: argparse.Namespace, test_list: str, val_list: str, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Score a finished run again without training; its training record is carried over from ``previous``."""
    run_dir = simulated_run_dir(workspace)
    if not os.path.isdir(run_dir):
        raise ValueError(f"--rescore: {workspace} holds no finished run ({run_dir} is missing); it never trains")
    results, checkpoint = score_run(run_dir, args, test_list, val_list)
    done = os.path.join(workspace, "results.json")
    if previous is not None:
        results["training"] = previous.get("training", {})
        results["rescored_from"] = {"erosion": erosion_of(previous), "options": previous.get("options")}
        kept = os.path.join(workspace, PREVIOUS_RESULTS)
        if os.path.isfile(kept):  # the results before the first rescore stay
            os.remove(done)
        else:
            os.replace(done, kept)
    results.setdefault("training", {})["checkpoint"] = os.path.basename(checkpoint)
    with open(done, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    logger.info("%s: scored again (erosion %s, was %s)", workspace, erosion_of(results), erosion_of(previous or {}))
    return results


def _pm(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _paired_auroc(a: dict[int, list[dict]], b: dict[int, list[dict]], n_boot: int = 10000) -> dict[str, Any] | None:
    """Per-test-case AUROC difference A - B averaged over the shared seeds, with a bootstrap 95 % interval over
    the test cases."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = []
    for s in seeds:
        ra = {c["case_id"]: c["auroc"] for c in a[s]}
        rb = {c["case_id"]: c["auroc"] for c in b[s]}
        cases = sorted(k for k in ra if k in rb and ra[k] is not None and rb[k] is not None)
        diffs.append([ra[k] - rb[k] for k in cases])
    per_case = np.mean(np.asarray(diffs), axis=0)
    draws = np.random.default_rng(0).integers(0, len(per_case), size=(n_boot, len(per_case)))
    low, high = np.percentile(per_case[draws].mean(axis=1), [2.5, 97.5])
    return {"seeds": seeds, "num_cases": len(per_case), "mean": float(per_case.mean()), "ci95": [low, high]}


def write_report(rows: dict[str, dict[int, list[dict[str, Any]]]], out_dir: str, command: str) -> str:
    """``comparison.md`` and ``comparison.json``: mean ± sd over seeds of each row (a local row first averages
    its sites), and paired per-case AUROC differences of MMCCD against each other row."""
    os.makedirs(out_dir, exist_ok=True)
    table = ["| Model | seeds | AUROC | AUPRC | Dice (threshold on validation) | Dice (best on test, optimistic) |"]
    table.append("|---|--:|--:|--:|--:|--:|")
    summary: dict[str, Any] = {}
    per_case: dict[str, dict[int, list[dict]]] = {}
    for name, by_seed in rows.items():
        values = {m: [float(np.mean([r["test"][m] for r in runs])) for runs in by_seed.values()] for m in METRICS}
        summary[name] = {m: values[m] for m in METRICS} | {"seeds": sorted(by_seed)}
        table.append(f"| {name} | {len(by_seed)} | " + " | ".join(_pm(values[m]) for m in METRICS) + " |")
        if all(len(runs) == 1 for runs in by_seed.values()):
            per_case[name] = {s: runs[0]["test"]["per_case"] for s, runs in by_seed.items()}
    erosions = sorted({erosion_of(r) for by_seed in rows.values() for runs in by_seed.values() for r in runs})
    if len(erosions) > 1:
        logger.warning("the rows were scored with different brain-mask erosions %s: --rescore them", erosions)
    first = next((runs[0] for by_seed in rows.values() for runs in by_seed.values()), None)
    if first is not None and "intensity_baseline" in first:
        # The same slices for every run: the model-free row is computed once.
        b = first["intensity_baseline"]
        table.append("| source intensity (no model) | - | " + " | ".join(f"{b[m]:.3f}" for m in METRICS) + " |")
        summary["source intensity (no model)"] = {m: b[m] for m in METRICS}
        per_case["source intensity (no model)"] = {s: b["per_case"] for s in next(iter(per_case.values()), {0: 0})}
    pairs = []
    reference = "mmccd federated"
    if reference in per_case:
        pairs = [
            "",
            "Paired per-case AUROC difference (A - B), mean over the shared seeds, 95 % bootstrap interval over the "
            "test cases:",
            "",
        ]
        pairs += ["| A vs B | seeds | cases | mean difference | 95 % interval |", "|---|--:|--:|--:|--:|"]
        for name in per_case:
            if name == reference:
                continue
            d = _paired_auroc(per_case[reference], per_case[name])
            if d:
                summary[f"{reference} - {name}"] = d
                pairs.append(
                    f"| {reference} vs {name} | {len(d['seeds'])} | {d['num_cases']} | {d['mean']:+.3f} | "
                    f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |"
                )
    scoring = [
        f"Brain mask of each scored slice eroded by: {', '.join(erosions)} (the public MMCCD code: disk(4)); the "
        "source intensity row is not eroded.",
        "",
    ]
    text = "\n".join([f"Produced by `{command}`", "", *scoring, *table, *pairs, ""])
    with open(os.path.join(out_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out_dir, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "erosion": erosions, "rows": summary}, f, indent=2, default=float)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default=None, help="sites.json with a pooled site (default: the synthetic federation)")
    p.add_argument("--workspace", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training option for all runs")
    p.add_argument("--net", action="append", default=[], metavar="KEY=VALUE", help="network argument for all runs")
    p.add_argument("--zoom", type=float, default=0.5, help="the runs' data.zoom (for scoring)")
    p.add_argument("--masks", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--brain-fraction", type=float, default=0.6)
    p.add_argument(
        "--erosion-disk-radius",
        type=int,
        default=EROSION_DISK_RADIUS,
        help="radius in pixels of the disk that erodes each slice's brain mask in the anomaly map (default 4, the "
        "public MMCCD code's disk(4); 0: none)",
    )
    p.add_argument(
        "--rescore",
        action="store_true",
        help="score the finished runs of the chosen rows again with these scoring options (never trains; the "
        "results before the first rescore are kept as results.previous.json)",
    )
    a = p.parse_args(argv)
    try:
        check_erosion_disk_radius(a.erosion_disk_radius, "--erosion-disk-radius")
    except ValueError as exc:
        p.error(str(exc))
    configure_logging("INFO")
    sites_file = federation_sites_file(a.sites, "mmccd_compare")
    sites, test_list, val_list = _sites(sites_file)
    rows: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for variant in a.variants:
        for mode in a.modes:
            groups = {"federated": [sites], "centralized": [[POOLED_SITE]], "local": [[s] for s in sites]}[mode]
            for seed in a.seeds:
                for clients in groups:
                    suffix = f"-{clients[0]}" if mode == "local" else ""
                    ws = os.path.join(a.workspace, f"{variant}-{mode}{suffix}", f"seed{seed}")
                    result = run_one(ws, variant, clients, seed, a, sites_file, test_list, val_list)
                    rows.setdefault(f"{variant} {mode}", {}).setdefault(seed, []).append(result)
                    logger.info("%s %s%s seed %d: test %s", variant, mode, suffix, seed, result["test"]["auroc"])
    command = " ".join([PROG, *(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))])
    logger.info("\n%s", write_report(rows, a.out_dir, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
