"""Run any fedbrats job's recipe in NVFlare's simulator, a PoC federation or a production federation.

::

    python -m fedbrats.job fedkd --env sim --rounds 2 --set epochs_per_round=1   # SimEnv, the sites of sites.json
    python -m fedbrats.job fedavg --env poc --poc-workspace /tmp/my_poc          # PocEnv: prepare, start, run, stop
    python -m fedbrats.job fedkd --env prod --startup-kit /path/admin@org.com    # ProdEnv: submit with an admin kit
    python -m fedbrats.job fedkd --export --export-dir jobs                      # NVFlare's flags: export only
    python -m fedbrats.job fedkd --env sim --tracking mlflow                     # curves to MLflow, not TensorBoard

The job is :class:`fedbrats.recipe.FedBratsRecipe` with the options below (the same as ``fedbrats simulate``); its
defaults are those of :mod:`fedbrats.jobgen`, so ``--export`` with no option writes the committed ``jobs/<name>``.
``--export`` and ``--export-dir`` are NVFlare's own recipe flags (``Recipe.execute``).

- ``sim``: NVFlare's simulator with the federation's sites (``--sites``, else ``FEDBRATS_SITE_CONFIG``, else the
  embedded synthetic federation), run by :func:`fedbrats.simulate.simulate` with its checks (an option at fault named
  before the start, a lost site, a run that aggregated nothing); the job in ``<workspace>/jobs``, the server's run
  folder ``<workspace>/sim/server/simulate_job``. ``fedbrats simulate`` is this same path.
- ``poc``: NVFlare's ``PocEnv`` (``nvflare poc`` prepare and start, submit, wait, stop). The sites read
  ``FEDBRATS_SITE_CONFIG`` (exported here from ``--sites``). PoC listens on port 8002 and keeps its settings in
  ``~/.nvflare`` unless ``--project-conf`` and ``--poc-workspace`` say otherwise; ``python -m deploy.poc`` from a
  checkout picks a free port and a private workspace by itself.
- ``prod``: NVFlare's ``ProdEnv``: submit to a running federation with an admin's startup kit; each site reads
  its own ``local/fedbrats_site.json``. The job goes without ``app/custom`` (not bring-your-own-code): the sites
  run it from their installed package with ``fedbrats.`` on their class allow-list (docs/deployment.md);
  ``--byoc on`` submits it as bring-your-own-code instead, which the submitter needs the right for.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from nvflare.recipe import PocEnv, ProdEnv, SimEnv
from nvflare.recipe.spec import ExecEnv, Recipe, _peek_recipe_args

from fedbrats.commands import run_command
from fedbrats.data.site_config import SITE_CONFIG_ENV, federation_sites_file
from fedbrats.evaluation.evaluate import preprocessing_options
from fedbrats.federated.memory import with_allocator_defaults
from fedbrats.federated.server.cross_site import run_model_files
from fedbrats.federated.tracking import DEFAULT_TRACKING, TRACKERS
from fedbrats.jobgen import JOBS, JobOptions
from fedbrats.recipe import CrossSiteEvaluationRecipe, FedBratsRecipe
from fedbrats.runs import CROSS_SITE_DIR, CROSS_SITE_RESULTS_FILE, find_in_one_run, resolve_checkpoint
from fedbrats.simulate import parse_overrides, simulate, site_names
from fedbrats.utils import deep_merge

logger = logging.getLogger(__name__)

ENVS = ("sim", "poc", "prod")
#: The job status NVFlare reports for a job that ran to its end without error.
COMPLETED = "FINISHED:COMPLETED"


#: The pseudo-job of ``python -m fedbrats.job``: the federated (cross-site) evaluation of finished models.
EVALUATE = "evaluate"


def add_job_arguments(parser: argparse.ArgumentParser, evaluate: bool = False) -> None:
    """The options of a job (``fedbrats simulate`` and ``python -m fedbrats.job`` share them); ``evaluate`` adds the
    :data:`EVALUATE` pseudo-job (``python -m fedbrats.job``)."""
    parser.add_argument("job", choices=sorted(JOBS) + ([EVALUATE] if evaluate else []))
    parser.add_argument(
        "--sites", default=None, help="sites.json (default: $FEDBRATS_SITE_CONFIG, else the embedded federation)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the job's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training option override")
    parser.add_argument("--agg", action="append", default=[], metavar="KEY=VALUE", help="aggregation argument")
    parser.add_argument("--net", action="append", default=[], metavar="KEY=VALUE", help="network argument")
    parser.add_argument("--resume-from", default="", help="a previous run dir to continue (model, rounds, prototypes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial model, data order and augmentation")
    parser.add_argument(
        "--compression",
        choices=("on", "off"),
        default=None,
        help="SVD-compressed updates both ways (default: the job's; on in fedmic); energies with --svd",
    )
    parser.add_argument(
        "--svd",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="energy_start, energy_end, error_feedback (true: the uplink keeps what it left out for the next round) or "
        "bits (8: int8 factors; 4: two 4-bit values a byte)",
    )
    parser.add_argument(
        "--tracking",
        choices=TRACKERS,
        default=DEFAULT_TRACKING,
        help="where the server sends every site's and the global model's curves (default: %(default)s; mlflow "
        "needs the mlflow extra at the server)",
    )
    parser.add_argument(
        "--tracking-uri", default="", help="MLflow tracking store (default: mlflow.db in the server's job results)"
    )
    parser.add_argument(
        "--cross-site-eval",
        choices=("on", "off"),
        default="on",
        help="end the job with the federated evaluation of its models on every site's test cases, the cross-site "
        "matrix in the server's cross_site_val/ (default: on, where the job's method has one)",
    )


def job_options(args: argparse.Namespace) -> JobOptions:
    """The run's :class:`~fedbrats.jobgen.JobOptions` from :func:`add_job_arguments`'s options, built once.

    Raises:
        ValueError: ``--svd`` with ``--compression off``, or a bad option (named).
    """
    compression: dict[str, Any] | bool | None = None if args.compression is None else args.compression == "on"
    if args.svd:
        if args.compression == "off":
            raise ValueError("--svd sets the energies of compression; it cannot go with --compression off")
        compression = parse_overrides(args.svd)
    fields = dict(
        num_rounds=args.rounds,
        training=parse_overrides(args.set),
        aggregation_args=parse_overrides(args.agg),
        network_args=parse_overrides(args.net),
        seed=args.seed,
        controller_args={"resume_from": os.path.abspath(args.resume_from)} if args.resume_from else {},
        compression=compression,
        tracking=args.tracking,
        tracking_uri=args.tracking_uri,
        cross_site_eval=args.cross_site_eval == "on",
    )
    return JobOptions(args.job, **{k: v for k, v in fields.items() if v is not None})


#: What ``python -m fedbrats.job`` does (its ``--help``).
JOB_DESCRIPTION = (
    "Run a fedbrats job recipe in NVFlare's simulator (sim), a PoC federation (poc) or a production federation "
    "(prod); NVFlare's --export [--export-dir DIR] writes the job folder instead."
)
#: What ``fedbrats simulate`` does (its ``--help``).
SIMULATE_DESCRIPTION = "Run a job in NVFlare's simulator with overrides (python -m fedbrats.job JOB --env sim)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m fedbrats.job``."""
    add_job_arguments(parser, evaluate=True)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="RUN_OR_BUNDLE",
        help="evaluate: a finished run's server folder (its final and best global models, or its site models), an "
        "exported model folder or a checkpoint; repeatable. In prod, a path on the server's machine",
    )
    parser.add_argument("--env", choices=ENVS, default="sim", help="where to run (default: sim)")
    parser.add_argument("--clients", default=None, help="sim/poc: comma-separated site names (default: --sites')")
    parser.add_argument("--threads", type=int, default=None, help="sim: sites run in parallel (default: all)")
    parser.add_argument(
        "--workspace",
        default="workspace/recipes",
        help="sim: the run's workspace (the job in WORKSPACE/jobs, the simulator's in WORKSPACE/sim; default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--poc-workspace", default=None, help="poc: a new folder for the PoC (required; created mode 0700)"
    )
    parser.add_argument("--project-conf", default="", help="poc: project.yml for `nvflare poc prepare` (e.g. a port)")
    parser.add_argument("--startup-kit", default=None, help="prod: the admin's startup kit folder")
    parser.add_argument("--username", default=None, help="poc/prod: the admin user (default: NVFlare's)")
    parser.add_argument("--study", default=None, help="poc/prod: the study to submit to (default: NVFlare's)")
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="poc/prod: seconds to wait for the job (0: no limit)"
    )
    parser.add_argument(
        "--byoc",
        choices=("on", "off"),
        default=None,
        help="give the job its app/custom folder, so that NVFlare treats it as bring-your-own-code (default: off "
        "for prod, where sites allow fedbrats. classes instead; on otherwise: NVFlare's simulator and PoC need it)",
    )


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedbrats simulate``: a job's, ``--workspace`` (required) and ``--threads``."""
    add_job_arguments(parser)
    parser.add_argument(
        "--workspace", required=True, help="the job in WORKSPACE/jobs, the simulator's in WORKSPACE/sim"
    )
    parser.add_argument("--threads", type=int, default=None, help="sites run in parallel (default: all)")
    parser.add_argument("--clients", default=None, help="comma-separated site names (default: --sites')")


def _clients(args: argparse.Namespace) -> list[str]:
    """The sites to start (sim, poc): ``--clients``, else those of the federation's ``sites.json``."""
    if args.clients:
        return [c.strip() for c in args.clients.split(",") if c.strip()]
    return site_names(os.environ[SITE_CONFIG_ENV], args.job)


def _admin_options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in (("username", args.username), ("study", args.study)) if v is not None}


def byoc(args: argparse.Namespace) -> bool:
    """Whether the job goes as bring-your-own-code (``--byoc``; default: not in production, else yes)."""
    return args.byoc == "on" if args.byoc else args.env != "prod"


def private_poc_workspace(path: str | None) -> str:
    """The PoC's workspace: a new (or empty) folder readable by this user only.

    NVFlare's PoC keeps the federation's root CA key and every site's private key in its workspace, readable by
    anyone in a shared default folder (/tmp/nvflare/poc), and stops and deletes a PoC it finds already running there.
    So ``--env poc`` runs only in a workspace of its own: created here mode 0700, refused when it holds anything.
    (``python -m deploy.poc`` from a checkout also binds the server to loopback and restricts every key file.)

    Raises:
        ValueError: no ``--poc-workspace``, a path that is not a folder, or a folder that is not empty.
    """
    if not path:
        raise ValueError(
            "--env poc needs --poc-workspace DIR, a new folder of its own: NVFlare's default /tmp/nvflare/poc is "
            "shared and would hold the federation's keys readable by others (or use python -m deploy.poc from a "
            "checkout)"
        )
    path = os.path.abspath(path)
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(
            f"--poc-workspace {path!r} exists and is not an empty folder; NVFlare's PoC would stop and delete what "
            "runs there. Choose a new folder"
        )
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def make_env(args: argparse.Namespace) -> ExecEnv:
    """The NVFlare execution environment ``--env`` names, with its options.

    Raises:
        ValueError: ``prod`` without ``--startup-kit``.
    """
    if args.env == "prod":
        if not args.startup_kit:
            raise ValueError("--env prod needs --startup-kit (the admin's startup kit folder)")
        return ProdEnv(startup_kit_location=os.path.abspath(args.startup_kit), **_admin_options(args))
    # The simulator's and PoC's site processes start from here: they read the federation's sites.json and get the
    # allocator settings (fedbrats.federated.memory).
    os.environ[SITE_CONFIG_ENV] = federation_sites_file(args.sites, f"{args.env} {args.job}")
    with_allocator_defaults(os.environ)
    clients = _clients(args)
    if args.env == "sim":
        return SimEnv(clients=clients, num_threads=args.threads, workspace_root=os.path.abspath(args.workspace))
    os.environ["NVFLARE_POC_WORKSPACE"] = private_poc_workspace(args.poc_workspace)
    # With --project-conf, NVFlare takes the sites from that file instead.
    return PocEnv(
        num_clients=len(clients), clients=clients, project_conf_path=args.project_conf, **_admin_options(args)
    )


def run_in_simulator(args: argparse.Namespace, options: JobOptions) -> int:
    """Run the job in the simulator through :func:`fedbrats.simulate.simulate` (its checks included)."""
    clients = [c.strip() for c in args.clients.split(",") if c.strip()] if args.clients else None
    result = simulate(options, args.workspace, sites_file=args.sites, clients=clients, threads=args.threads)
    logger.info("%s finished in %.1fs; server run dir %s", options.job, result.seconds, result.run_dir)
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``fedbrats simulate``: the same as ``python -m fedbrats.job JOB --env sim``."""
    return run_in_simulator(args, job_options(args))


def evaluation_models(paths: list[str]) -> dict[str, str]:
    """The models of an on-demand cross-site evaluation, by name, from ``--model`` paths.

    A run folder gives its final and best global models (``FL_global_model.pt``, ``best_FL_global_model.pt``) or,
    for local-only training, the site models it holds (named by site:
    :func:`~fedbrats.federated.server.cross_site.run_model_files`); an exported model folder or a checkpoint gives
    one model, named by the path's last part. With several paths, each name is prefixed by its path's last part.

    Raises:
        ValueError: no path, a path that holds no model (named), or two models of the same name.
    """
    if not paths:
        raise ValueError("python -m fedbrats.job evaluate needs --model RUN_OR_BUNDLE (a run folder or exported model)")
    models: dict[str, str] = {}
    for path in paths:
        path = os.path.abspath(path)
        label = os.path.basename(os.path.normpath(path))
        found = run_model_files(path) or {label: resolve_checkpoint(path)}
        for name, file in found.items():
            key = f"{label}/{name}" if len(paths) > 1 and name != label else name
            if key in models:
                raise ValueError(f"--model: two models named {key!r} ({models[key]}, {file}); pass other folders")
            models[key] = file
    return models


def evaluation_recipe(args: argparse.Namespace, deploy_min_clients: int | None) -> CrossSiteEvaluationRecipe:
    """The on-demand cross-site evaluation's recipe: ``--model``'s models with the preprocessing they were trained
    with (recorded beside the first one; see :func:`fedbrats.evaluation.evaluate.preprocessing_options`)."""
    models = evaluation_models(args.model)
    roi_size, zoom = preprocessing_options(next(iter(models.values())), None, None, "cross-site evaluation")
    # --set adds the sites' other options (val_overlap, precision, device, num_threads, min_test_cases).
    training = deep_merge({"data": {"roi_size": list(roi_size), "zoom": zoom}}, parse_overrides(args.set))
    logger.info("cross-site evaluation of %s with %s", sorted(models), training)
    return CrossSiteEvaluationRecipe(
        models,
        training,
        tracking=args.tracking,
        tracking_uri=args.tracking_uri,
        deploy_min_clients=deploy_min_clients,
        byoc=byoc(args),
    )


def run(args: argparse.Namespace) -> int:
    """Run (or, with NVFlare's ``--export``, export) a job's recipe where ``--env`` says."""
    evaluating = args.job == EVALUATE
    if args.model and not evaluating:
        raise ValueError(f"--model is an option of `python -m fedbrats.job {EVALUATE}`, not of a training job")
    options = None if evaluating else job_options(args)
    exporting, _ = _peek_recipe_args()
    if args.env == "sim" and not exporting and options is not None:
        return run_in_simulator(args, options)
    env = make_env(args)
    deploy_min_clients = env.num_clients if isinstance(env, PocEnv) else None
    # NVFlare's PoC submits a few seconds after starting the sites: wait for all of them, not the first.
    if options is None:
        recipe: Recipe = evaluation_recipe(args, deploy_min_clients)
    else:
        recipe = FedBratsRecipe(options, byoc=byoc(args), deploy_min_clients=deploy_min_clients)
    run = recipe.execute(env)  # exits here after an --export
    logger.info("job %s deployed as %s (%s)", args.job, run.get_job_id(), args.env)
    # clean_up=False: a PoC workspace (and the result downloaded into it) stays; the PoC itself is stopped.
    result = run.get_result(timeout=args.timeout, clean_up=False)
    status = run.get_status()
    logger.info("%s ended with status %s; result %s", args.job, status, result)
    if evaluating:
        return _evaluation_outcome(result, status)
    return 0 if status == COMPLETED and result else 1


def _evaluation_outcome(result: str | None, status: str | None) -> int:
    """0 when the evaluation's results came back (the simulator reports no status, so the file decides), else 1."""
    try:
        found = find_in_one_run(result, CROSS_SITE_DIR, CROSS_SITE_RESULTS_FILE, what="result") if result else None
    except ValueError:
        found = None
    if found and status in (None, COMPLETED):
        logger.info("cross-site evaluation: results in %s, the matrix beside them", found)
        return 0
    logger.error("cross-site evaluation: no results came back (status %s, result %s)", status, result)
    return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m fedbrats.job``: run (or, with NVFlare's ``--export``, export) a job's recipe; 0 on success."""
    return run_command("job", add_arguments, run, argv, JOB_DESCRIPTION, prog="python -m fedbrats.job")


if __name__ == "__main__":
    sys.exit(main())
