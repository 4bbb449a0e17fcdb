"""NVFlare PoC mode on one machine: one command prepares, starts, runs a job, downloads the model and stops.

::

    python -m fedbrats.deploy.poc --sites 4 --num-rounds 2        # or poc_setup/run_poc.sh ...

What it does, in a private workspace (``--workspace``, default ``$TMPDIR/fedbrats_poc``):

1. picks a free server port and writes the PoC project: ``poc_setup/project.yml`` with the first N sites, the
   server renamed ``localhost`` (it listens on loopback only) at that port;
2. ``nvflare poc prepare -i <project> --force`` with ``NVFLARE_POC_WORKSPACE=<workspace>/poc`` and a private
   ``HOME`` (``nvflare poc`` writes ``~/.nvflare/config.conf``; the user's own stays untouched);
3. writes each site's ``local/fedbrats_site.json`` (synthetic data by default, or ``--sites-json``);
4. ``nvflare poc start``, then logs in as the project admin (it has the bring-your-own-code right the jobs'
   ``app/custom`` needs) and waits for every site;
5. submits the job, logs its status and the server's round lines until it ends, downloads the result;
6. ``nvflare poc stop``, then checks that no process of the workspace is left and the port is free (kills and
   reports leftovers). Ctrl-C, SIGTERM or an error at any step go straight to this step.

Each step's duration, and each round's, is logged and written to ``<output>/run_report.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from fedbrats.deploy.provision import (
    Deployment,
    Kits,
    add_run_arguments,
    latest_prod_dir,
    nvflare_cli,
    run_cli,
    run_from_args,
    write_project,
)

logger = logging.getLogger(__name__)

#: Project name of PoC federations (the kits are under ``<workspace>/poc/<name>/prod_00``).
POC_PROJECT_NAME = "fedbrats_poc"


class PocDeployment(Deployment):
    """A PoC federation started and stopped with ``nvflare poc`` in its own workspace (see the module docstring)."""

    mode = "poc"

    @property
    def poc_workspace(self) -> str:
        """The folder ``nvflare poc`` manages (``NVFLARE_POC_WORKSPACE``)."""
        return os.path.join(self.workspace, "poc")

    def _localized_project(self) -> dict[str, Any]:
        project = super()._localized_project()
        project["name"] = POC_PROJECT_NAME
        return project

    def prepare(self, project: dict[str, Any]) -> Kits:
        self.env["NVFLARE_POC_WORKSPACE"] = self.poc_workspace
        # The project file must live outside the PoC workspace, which prepare deletes and recreates.
        project_file = write_project(project, os.path.join(self.workspace, "poc_project.yml"))
        shutil.rmtree(self.poc_workspace, ignore_errors=True)
        run_cli([nvflare_cli(), "poc", "prepare", "-i", project_file, "--force"], self.env, "nvflare poc prepare")
        return Kits.from_project(latest_prod_dir(self.poc_workspace, project["name"]), project)

    def start(self) -> None:
        run_cli([nvflare_cli(), "poc", "start", "--timeout", "90"], self.env, "nvflare poc start", timeout=150)

    def stop(self) -> None:
        if self.session is not None:  # poc stop logs in itself; free this login first
            try:
                self.session.close()
            except Exception:
                pass
            self.session = None
        run_cli([nvflare_cli(), "poc", "stop"], self.env, "nvflare poc stop", timeout=120)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedbrats.deploy.poc``: run a job in a PoC federation on this machine."""
    parser = argparse.ArgumentParser(
        prog="python -m fedbrats.deploy.poc",
        description="Prepare an NVFlare PoC federation (server + site-1..site-N on loopback, a free port, a private "
        "workspace), write each site's local data configuration, run a job, download the global model, stop "
        "everything and check that nothing is left running.",
    )
    add_run_arguments(parser, os.path.join(tempfile.gettempdir(), "fedbrats_poc"))
    return run_from_args(PocDeployment, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
