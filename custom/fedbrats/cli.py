"""The ``fedbrats`` command: data preparation, job generation, simulation, evaluation, export and inference."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from fedbrats.logging_setup import configure_logging


def _synth_federation(argv: list[str]) -> int:
    from fedbrats.data.federation import DEFAULT_SITE_MODALITIES, make_synthetic_federation

    p = argparse.ArgumentParser(prog="fedbrats synth-federation", description="Generate a synthetic federation.")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--cases-per-site", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--convention", default="brats2018", choices=["brats2018", "brats2023"])
    p.add_argument(
        "--site-modalities",
        default=None,
        help=f"JSON mapping site -> sequences (default {json.dumps(DEFAULT_SITE_MODALITIES)})",
    )
    a = p.parse_args(argv)
    profiles = json.loads(a.site_modalities) if a.site_modalities else None
    path = make_synthetic_federation(
        a.out_dir,
        cases_per_site=a.cases_per_site,
        size=a.size,
        seed=a.seed,
        site_modalities=profiles,
        convention=a.convention,
    )
    logging.getLogger("fedbrats").info("federation written: %s", path)
    return 0


def _pool_sites(argv: list[str]) -> int:
    from fedbrats.data.federation import add_pooled_site

    p = argparse.ArgumentParser(prog="fedbrats pool-sites", description="Add the pooled 'central' site to sites.json.")
    p.add_argument("sites_file")
    p.add_argument("--force", action="store_true", help="replace an existing site of that name that is not a pool")
    a = p.parse_args(argv)
    add_pooled_site(a.sites_file, force=a.force)
    return 0


def edited_job_files(out_dir: str) -> list[str]:
    """Files under ``out_dir`` that ``make-jobs`` would change: hand edits it would silently revert."""
    from fedbrats.jobgen import JOBS
    from fedbrats.recipe import job_files

    changed = []
    for name in sorted(JOBS):
        for rel, content in job_files(name).items():
            path = os.path.join(out_dir, name, rel)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                text = f.read()
            try:
                same = text == content or json.loads(text) == json.loads(content)
            except json.JSONDecodeError:
                same = False
            if not same:
                changed.append(path)
    return changed


def _make_jobs(argv: list[str]) -> int:
    from fedbrats.recipe import write_all_jobs

    p = argparse.ArgumentParser(prog="fedbrats make-jobs", description="(Re)write the job folders.")
    p.add_argument("--out-dir", default="jobs")
    p.add_argument(
        "--force", action="store_true", help="rewrite job files that differ from the recipes' export (hand edits)"
    )
    a = p.parse_args(argv)
    edited = [] if a.force else edited_job_files(a.out_dir)
    if edited:
        raise ValueError(
            f"make-jobs would revert {len(edited)} edited job file(s): {edited}. Put the change in "
            "custom/fedbrats/jobgen.py (the defaults) or custom/fedbrats/recipe.py (the components), or pass --force "
            "to discard the edits"
        )
    for path in write_all_jobs(a.out_dir):
        logging.getLogger("fedbrats").info("wrote %s", path)
    return 0


def _simulate(argv: list[str]) -> int:
    from fedbrats.federated.simulate import simulate
    from fedbrats.job import add_job_arguments, recipe_options

    p = argparse.ArgumentParser(prog="fedbrats simulate", description="Run a job in the NVFlare simulator.")
    add_job_arguments(p)
    p.add_argument("--workspace", required=True)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    options = recipe_options(a)
    result = simulate(
        a.job,
        a.workspace,
        sites_file=a.sites,
        num_rounds=options.get("num_rounds"),
        overrides=options["training"],
        aggregation_args=options["aggregation_args"],
        controller_args=options["controller_args"],
        threads=a.threads,
        seed=options["seed"],
        network_args=options["network_args"],
        compression=options["compression"],
        tracking=options["tracking"],
        tracking_uri=options["tracking_uri"],
    )
    logging.getLogger("fedbrats").info("run dir: %s (%.1fs)", result.run_dir, result.seconds)
    return 0


COMMANDS = {
    "synth": "generate synthetic BraTS cases",
    "synth-federation": "generate a synthetic federation with datalists (sites.json)",
    "prepare": "scan and validate a BraTS folder, write per-site datalists, sites.json and an nnU-Net dataset.json",
    "pool-sites": "add the pooled 'central' site (centralized baseline) to a sites.json",
    "make-jobs": "rewrite the job folders (the export of each job's recipe)",
    "simulate": "run a job in the NVFlare simulator with overrides",
    "evaluate": "score a model on all 15 sequence combinations (JSON, markdown, heatmaps)",
    "export": "package a trained model as a MONAI bundle",
    "predict": "segment a new patient from any subset of sequences",
    "anomaly": "write the anomaly map of a new patient's FLAIR (jobs/mmccd)",
    "anomaly-eval": "score an anomaly model (jobs/mmccd) on test slices: AUROC, AUPRC, Dice",
    "plot-run": "plot a run's curves (validation, training loss, every loss term by round) to PNG",
}
_MODULES = {
    "synth": "fedbrats.data.synthetic",
    "prepare": "fedbrats.data.prepare",
    "evaluate": "fedbrats.evaluation.evaluate",
    "export": "fedbrats.evaluation.export",
    "predict": "fedbrats.evaluation.predict",
    "anomaly-eval": "fedbrats.evaluation.anomaly",
    "plot-run": "fedbrats.evaluation.curves",
}
#: Commands that moved out of the package (tooling a site or a server never runs), and what replaces them.
MOVED = {
    "compare": "python experiments/compare.py (from a source checkout of fedbrats)",
}


def _anomaly(argv: list[str]) -> int:
    from fedbrats.evaluation.anomaly import map_main

    return map_main(argv)


_FUNCS = {
    "anomaly": _anomaly,
    "synth-federation": _synth_federation,
    "pool-sites": _pool_sites,
    "make-jobs": _make_jobs,
    "simulate": _simulate,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedbrats`` command."""
    argv = sys.argv[1:] if argv is None else argv
    configure_logging("INFO")
    if argv and argv[0] in ("-V", "--version"):
        import fedbrats

        sys.stdout.write(f"fedbrats {fedbrats.__version__}\n")
        return 0
    if argv and argv[0] in MOVED:
        sys.stderr.write(f"fedbrats: {argv[0]!r} is no longer part of the package; run {MOVED[argv[0]]}\n")
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
        usage = "usage: fedbrats [--version] COMMAND [options]\n\ncommands:\n" + "\n".join(lines)
        asked = bool(argv) and argv[0] in ("-h", "--help")
        if argv and not asked:
            # Say what was wrong before the usage, as argparse does for an unknown choice.
            usage = f"fedbrats: {argv[0]!r} is not a command; choose one of the commands below\n\n{usage}"
        (sys.stdout if asked else sys.stderr).write(usage + "\n")
        return 0 if asked else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in _FUNCS:
            return _FUNCS[command](rest)
        import importlib

        return int(importlib.import_module(_MODULES[command]).main(rest) or 0)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        logging.getLogger("fedbrats").error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
