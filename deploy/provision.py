"""The production rehearsal: startup kits from ``nvflare provision``, each started with its own ``start.sh``.

``python -m deploy.provision`` rehearses a production deployment on loopback: provision, start the server
and the clients from their kits (mutual TLS), submit a job as the project admin, follow it, download the global
model, shut everything down and check that no process or port is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from deploy.admin import open_admin_session
from deploy.cli import add_run_arguments, run_from_args
from deploy.deployment import Deployment
from deploy.kits import Kits, provision
from deploy.processes import start_kit, wait_for_listener
from deploy.project import write_project
from deploy.secrets import default_workspace

logger = logging.getLogger(f"fedbrats.{__name__}")


class ProvisionedDeployment(Deployment):
    """Production startup kits from ``nvflare provision``, started with their own ``start.sh`` on loopback."""

    mode = "provisioned"

    def prepare(self, project: dict[str, Any]) -> Kits:
        prov = os.path.join(self.workspace, "provision")
        shutil.rmtree(prov, ignore_errors=True)
        project_file = write_project(project, os.path.join(self.workspace, "project.yml"))
        return provision(project_file, prov, self.env)

    def start(self) -> None:
        assert self.kits is not None
        server_dir = self.kits.dir(self.kits.server)
        start_kit(server_dir, self.env)
        waited = wait_for_listener(self.port, "127.0.0.1", 60, "the FL server", os.path.join(server_dir, "log.txt"))
        logger.info("server listening on localhost:%d after %.1fs", self.port, waited)
        for client in self.kits.clients:
            start_kit(self.kits.dir(client), self.env)

    def stop(self) -> None:
        from nvflare.fuel.flare_api.api_spec import TargetType

        if self.session is None:
            self.session = open_admin_session(self.kits, timeout=10)
        # No waiting here: ensure_stopped() then watches the processes and the port themselves.
        self.session.shutdown(TargetType.ALL, wait=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deploy.provision``: rehearse the production deployment on loopback."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.provision",
        description="Provision from poc_setup/project.yml (server on localhost, a free port, N sites), start the "
        "server and the clients from their startup kits (mutual TLS), run a job, download the global model, shut "
        "down and check that nothing is left running.",
    )
    add_run_arguments(parser, default_workspace("fedbrats_provisioned"))
    return run_from_args(ProvisionedDeployment, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
