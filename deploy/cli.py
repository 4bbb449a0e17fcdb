"""Command-line options and the run shared by ``python -m deploy.poc`` and ``python -m deploy.provision``."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from deploy.deployment import Deployment
from deploy.processes import DeploymentError, nvflare_cli, raise_on_termination
from deploy.project import REPO_ROOT

logger = logging.getLogger(f"fedbrats.{__name__}")


# ---- command line -----------------------------------------------------------------------------------------------
def default_job_dir() -> str:
    """``jobs/fedkd`` if it exists, else ``jobs/fedavg`` (of this checkout, else of the current folder)."""
    for root in (REPO_ROOT, Path.cwd()):
        for name in ("fedkd", "fedavg"):
            if (root / "jobs" / name / "meta.json").is_file():
                return str(root / "jobs" / name)
    raise DeploymentError("no jobs/fedkd or jobs/fedavg found; pass --job")


def add_run_arguments(parser: argparse.ArgumentParser, default_workspace: str) -> None:
    """Options shared by the PoC and the provisioned rehearsal."""
    parser.add_argument("-w", "--workspace", default=default_workspace, help="run folder (default %(default)s)")
    parser.add_argument("-n", "--sites", type=int, default=4, help="number of sites site-1..site-N (default 4)")
    parser.add_argument("--job", default=None, help="job folder (default jobs/fedkd if present, else jobs/fedavg)")
    parser.add_argument("--num-rounds", type=int, default=None, help="override the job's number of rounds")
    parser.add_argument("-o", "--output", default=None, help="where the result goes (default <workspace>/result)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--project", default=None, help="project file (default poc_setup/project.yml)")
    parser.add_argument("--sites-json", default=None, help="existing federation (fedbrats prepare); default synthetic")
    parser.add_argument("--cases-per-site", type=int, default=10, help="synthetic cases per site (default 10)")
    parser.add_argument("--size", type=int, default=32, help="synthetic volume size (default 32)")
    parser.add_argument(
        "--no-byoc",
        action="store_true",
        help="submit the job without app/custom and put fedbrats. on each site's class_allow_list instead",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the job is aborted")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log the nvflare commands' output")


def run_from_args(cls: type[Deployment], args: argparse.Namespace) -> int:
    """Build a deployment from parsed options, run it, and return the exit status (0 when all went well)."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("nvflare").setLevel(logging.WARNING)
    raise_on_termination()
    try:
        job = args.job or default_job_dir()
        nvflare_cli()
    except DeploymentError as e:
        logger.error("%s", e)
        return 2
    deployment = cls(
        args.workspace,
        args.sites,
        project_file=args.project,
        sites_json=args.sites_json,
        cases_per_site=args.cases_per_site,
        size=args.size,
        port=args.port,
        byoc=not args.no_byoc,
    )
    output = args.output or os.path.join(deployment.workspace, "result")
    report = deployment.run(job, output, num_rounds=args.num_rounds, timeout=args.timeout)
    return 0 if report.ok else 1
