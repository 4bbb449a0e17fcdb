"""The ``fedbrats`` command: every subcommand from one table, run by :func:`fedbrats.commands.run_command`.

A subcommand is a module's pair of functions, ``add_arguments(parser)`` and ``run(args) -> int`` (the table names
them where a module holds several commands). Only the chosen command's module is imported, so ``fedbrats --help``
stays fast. Parsing, logging and exit codes are :mod:`fedbrats.commands`' (1: a usage error said in one line).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One ``fedbrats`` subcommand.

    Attributes:
        module: the module that holds it.
        help: one line for ``fedbrats --help``.
        add_arguments: the function that adds its options to a parser.
        run: the function that runs it with the parsed options.
        description: the module attribute holding its ``--help`` description.
    """

    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"
    description: str | None = None


#: Every subcommand of ``fedbrats``.
COMMANDS: dict[str, Command] = {
    "synth": Command("fedbrats.data.synthetic", "generate synthetic BraTS cases", description="SYNTH_DESCRIPTION"),
    "synth-federation": Command(
        "fedbrats.data.federation",
        "generate a synthetic federation with datalists (sites.json)",
        "add_synth_federation_arguments",
        "run_synth_federation",
        "SYNTH_FEDERATION_DESCRIPTION",
    ),
    "prepare": Command(
        "fedbrats.data.prepare",
        "scan and validate a BraTS folder, write per-site datalists, sites.json and an nnU-Net dataset.json",
        description="PREPARE_DESCRIPTION",
    ),
    "pool-sites": Command(
        "fedbrats.data.federation",
        "add the pooled 'central' site (centralized baseline) to a sites.json",
        "add_pool_sites_arguments",
        "run_pool_sites",
        "POOL_SITES_DESCRIPTION",
    ),
    "make-jobs": Command(
        "fedbrats.recipe",
        "rewrite the job folders (the export of each job's recipe)",
        "add_make_jobs_arguments",
        "run_make_jobs",
        "MAKE_JOBS_DESCRIPTION",
    ),
    "simulate": Command(
        "fedbrats.job",
        "run a job in the NVFlare simulator with overrides (python -m fedbrats.job JOB --env sim)",
        "add_simulate_arguments",
        "run_simulate",
        "SIMULATE_DESCRIPTION",
    ),
    "evaluate": Command(
        "fedbrats.evaluation.evaluate",
        "score a model on all 15 sequence combinations (JSON, markdown, heatmaps)",
        description="EVALUATE_DESCRIPTION",
    ),
    "export": Command(
        "fedbrats.evaluation.export", "package a trained model as a MONAI bundle", description="EXPORT_DESCRIPTION"
    ),
    "predict": Command(
        "fedbrats.evaluation.predict",
        "segment a new patient from any subset of sequences",
        description="PREDICT_DESCRIPTION",
    ),
    "anomaly": Command(
        "fedbrats.evaluation.anomaly",
        "write the anomaly map of a new patient's FLAIR (jobs/mmccd)",
        "add_map_arguments",
        "run_map",
        "ANOMALY_DESCRIPTION",
    ),
    "anomaly-eval": Command(
        "fedbrats.evaluation.anomaly",
        "score an anomaly model (jobs/mmccd) on test slices: AUROC, AUPRC, Dice",
        description="ANOMALY_EVAL_DESCRIPTION",
    ),
    "plot-run": Command(
        "fedbrats.evaluation.curves",
        "plot a run's curves (validation, training loss, every loss term by round) to PNG",
        description="PLOT_RUN_DESCRIPTION",
    ),
    "cross-site": Command(
        "fedbrats.federated.server.cross_site_report",
        "report a run's cross-site evaluation: model x site matrix of mean Dice (JSON, markdown, heatmap)",
        description="CROSS_SITE_DESCRIPTION",
    ),
}
#: Commands that moved out of the package (tooling a site or a server never runs), and what replaces them.
MOVED = {
    "compare": "python experiments/compare.py (from a source checkout of fedbrats)",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    return "usage: fedbrats [--version] COMMAND [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedbrats`` command: run the subcommand ``argv[0]`` with the rest of ``argv``."""
    from fedbrats.commands import run_command

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-V", "--version"):
        import fedbrats

        sys.stdout.write(f"fedbrats {fedbrats.__version__}\n")
        return 0
    if argv and argv[0] in MOVED:
        sys.stderr.write(f"fedbrats: {argv[0]!r} is no longer part of the package; run {MOVED[argv[0]]}\n")
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        usage = _usage()
        if argv and not asked:
            # Say what was wrong before the usage, as argparse does for an unknown choice.
            usage = f"fedbrats: {argv[0]!r} is not a command; choose one of the commands below\n\n{usage}"
        (sys.stdout if asked else sys.stderr).write(usage + "\n")
        return 0 if asked else 2
    name, command = argv[0], COMMANDS[argv[0]]
    module = importlib.import_module(command.module)
    description = getattr(module, command.description) if command.description else None
    return run_command(
        name, getattr(module, command.add_arguments), getattr(module, command.run), argv[1:], description
    )


if __name__ == "__main__":
    sys.exit(main())
