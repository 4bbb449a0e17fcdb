"""NVFlare PoC mode on one machine: one command prepares, starts, runs a job, downloads the model and stops.

::

    python -m deploy.poc --sites 4 --num-rounds 2        # or poc_setup/run_poc.sh ...

What it does, in a private workspace (``--workspace``, default ``$TMPDIR/fedbrats_poc-<uid>``, mode 0700; key
files are made 0600):

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

For failure drills (``tests/test_poc_failover.py``), :meth:`PocDeployment.started` keeps a federation up for
several jobs, :meth:`PocDeployment.kill_site` crashes one site (SIGKILL of its supervisor, client and job
processes) and :meth:`PocDeployment.restart_site` starts it again from its kit, as a hospital's IT would.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from deploy.admin import open_admin_session, wait_for_clients
from deploy.cli import add_run_arguments, run_from_args
from deploy.deployment import Deployment, RunReport
from deploy.kits import Kits, latest_prod_dir, run_cli
from deploy.processes import CleanupReport, DeploymentError, describe, nvflare_cli, start_kit
from deploy.project import write_project
from deploy.secrets import default_workspace, restrict_secrets

logger = logging.getLogger(f"fedbrats.{__name__}")

#: Project name of PoC federations (the kits are under ``<workspace>/poc/<name>/prod_00``).
POC_PROJECT_NAME = "fedbrats_poc"
#: What a participant's NVFlare process logs once the server accepted its registration.
REGISTERED_LINE = "Successfully registered client:"


def _names_kit(arg: str, kit_dir: str) -> bool:
    return arg == kit_dir or arg.startswith(kit_dir + os.sep)


def kit_processes(kit_dir: str) -> list[psutil.Process]:
    """The running processes of one participant's kit, supervisor first.

    These are the supervisor loop of ``startup/start.sh`` (``startup/sub_start.sh``, pid in ``daemon_pid.fl``),
    the participant's NVFlare process (pid in ``pid.fl``), its job processes, and anything else whose command line
    names the kit folder (``site-1`` does not match ``site-10``).

    Args:
        kit_dir: the participant's kit folder.
    """
    kit_dir = os.path.abspath(kit_dir)
    roots: list[psutil.Process] = []
    for pid_file in ("daemon_pid.fl", "pid.fl"):
        try:
            roots.append(psutil.Process(int(Path(kit_dir, pid_file).read_text().strip())))
        except (OSError, ValueError, psutil.NoSuchProcess):
            continue
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(_names_kit(arg, kit_dir) for arg in proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found: dict[int, psutil.Process] = {}
    for proc in roots:
        try:
            for p in [proc, *proc.children(recursive=True)]:
                found.setdefault(p.pid, p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def kill_kit(kit_dir: str, timeout: float = 10.0) -> list[str]:
    """Crash one participant: SIGKILL its supervisor, its NVFlare process and its job processes.

    The supervisor goes first, so that it cannot start the participant again; nothing is told to the server, as
    when a machine loses power. The kit is scanned again until none of its processes is left.

    Args:
        kit_dir: the participant's kit folder.
        timeout: seconds to wait for the killed processes to be gone.

    Returns:
        the killed processes as ``pid: command``.

    Raises:
        DeploymentError: a process survived SIGKILL for ``timeout`` seconds.
    """
    killed: list[str] = []
    for _ in range(5):
        procs = kit_processes(kit_dir)
        if not procs:
            break
        killed += [describe(p) for p in procs]
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        if alive:
            raise DeploymentError(f"processes of {kit_dir} survived SIGKILL: {[describe(p) for p in alive]}")
    for line in killed:
        logger.info("killed %s", line)
    return killed


class PocDeployment(Deployment):
    """A PoC federation started and stopped with ``nvflare poc`` in its own workspace (see the module docstring)."""

    mode = "poc"
    #: What was left after :meth:`started` stopped the federation (``None`` before).
    cleanup: CleanupReport | None = None

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
        restrict_secrets(self.poc_workspace)
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

    # ---- a federation kept up for several jobs, and failure drills ----
    @contextlib.contextmanager
    def started(self) -> Iterator[Kits]:
        """Prepare and start the federation, log in and wait for every site; on exit stop and check everything.

        Use the admin session (``self.session``) inside, e.g. with
        :func:`~deploy.provision.submit_and_follow`. On exit, also after an error or Ctrl-C, the
        federation is stopped and every process of the workspace that is left is killed and reported in
        :attr:`cleanup`.

        Yields:
            the startup kits.
        """
        self.cleanup = None
        report = RunReport(self.mode, self.workspace)
        started = False
        try:
            self._setup()
            project = self._localized_project()
            self.kits = self.prepare(project)
            self._site_configs(self.kits)
            started = True
            self.start()
            self.session = open_admin_session(self.kits)
            wait_for_clients(self.session, self.kits)
            logger.info("server localhost:%d and clients %s up", self.port, ", ".join(self.kits.clients))
            yield self.kits
        finally:
            self._shutdown(report, started)
            self.cleanup = CleanupReport(report.leftovers, report.port_free, report.timings.get("gone_s", 0.0))

    def kill_site(self, site: str) -> list[str]:
        """Crash ``site`` (see :func:`kill_kit`); return the killed processes as ``pid: command``."""
        assert self.kits is not None, "the federation is not prepared"
        return kill_kit(self.kits.dir(site))

    def restart_site(self, site: str, timeout: float = 90.0) -> float:
        """Start ``site`` again from its kit (``startup/start.sh``) and wait until the server accepted it.

        Returns:
            the seconds until the site logged its registration.

        Raises:
            DeploymentError: it did not register within ``timeout`` seconds.
        """
        assert self.kits is not None, "the federation is not prepared"
        kit_dir = self.kits.dir(site)
        log = Path(kit_dir, "log.txt")
        offset = log.stat().st_size if log.is_file() else 0
        started = time.monotonic()
        start_kit(kit_dir, self.env)
        while time.monotonic() - started < timeout:
            if log.is_file() and log.stat().st_size > offset:
                with open(log, encoding="utf-8", errors="replace") as f:
                    f.seek(offset)
                    if REGISTERED_LINE + site in f.read():
                        waited = time.monotonic() - started
                        logger.info("%s restarted and registered with the server in %.1fs", site, waited)
                        return waited
            time.sleep(0.5)
        raise DeploymentError(f"{site} did not register with the server within {timeout:.0f}s after restart; see {log}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deploy.poc``: run a job in a PoC federation on this machine."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.poc",
        description="Prepare an NVFlare PoC federation (server + site-1..site-N on loopback, a free port, a private "
        "workspace), write each site's local data configuration, run a job, download the global model, stop "
        "everything and check that nothing is left running.",
    )
    add_run_arguments(parser, default_workspace("fedbrats_poc"))
    return run_from_args(PocDeployment, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
