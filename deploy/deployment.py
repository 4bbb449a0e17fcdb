"""A whole run of a federation on this machine (PoC or provisioned kits): prepare, start, run a job, stop, report."""

from __future__ import annotations

import abc
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from deploy.admin import download_result, open_admin_session, submit_and_follow, wait_for_clients
from deploy.kits import (
    FEDBRATS_CLASS_ALLOW_LIST,
    Kits,
    allow_fedbrats_classes,
    make_demo_federation,
    private_stores,
    stage_job,
    write_site_configs,
)
from deploy.processes import (
    DeploymentError,
    deployment_env,
    describe,
    ensure_stopped,
    find_free_port,
    find_processes,
    kill_processes,
    listening_pids,
    port_is_free,
    request_kit_stop,
    signals_deferred,
)
from deploy.project import load_project, local_project
from deploy.secrets import make_private_dir

logger = logging.getLogger(f"fedbrats.{__name__}")


# ---- a whole run ------------------------------------------------------------------------------------------------
@dataclass
class RunReport:
    """What a run did and how long each step took (written to ``<output>/run_report.json``).

    Attributes:
        mode: ``poc`` or ``provisioned``.
        workspace: the run's workspace.
        port: the server port.
        sites: the clients.
        job_id: the job's id.
        status: the job's final status.
        global_model: path of the downloaded global model.
        result_dir: the downloaded job result.
        timings: seconds per step (prepare, start, clients, job, download, stop, gone) and per round.
        leftovers: processes killed after the orderly stop.
        port_free: whether the port was free at the end.
        error: what went wrong, if something did.
    """

    mode: str
    workspace: str
    port: int = 0
    sites: list[str] = field(default_factory=list)
    job_id: str = ""
    status: str = ""
    global_model: str | None = None
    result_dir: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    port_free: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        """The job completed, the model came back and nothing was left running."""
        return (
            self.status == "FINISHED:COMPLETED"
            and bool(self.global_model)
            and not self.leftovers
            and self.port_free
            and not self.error
        )


class Deployment(abc.ABC):
    """One federation on this machine: prepared, started, used for one job, stopped and checked.

    Args:
        workspace: folder for everything the run writes (created; a previous run's content is replaced).
        num_sites: number of clients (``site-1`` ... as in the project file).
        project_file: the production project file (default ``poc_setup/project.yml``).
        sites_json: an existing federation's ``sites.json``; default: synthetic data made in the workspace.
        cases_per_site: synthetic cases per site.
        size: synthetic volume size.
        port: server port; 0 picks a free one.
        byoc: submit jobs with ``app/custom`` (needs the BYOC right); ``False`` removes it and adds the fedbrats
            classes to every site's allow-list instead.
    """

    mode = "?"

    def __init__(
        self,
        workspace: str,
        num_sites: int = 2,
        *,
        project_file: str | None = None,
        sites_json: str | None = None,
        cases_per_site: int = 10,
        size: int = 32,
        port: int = 0,
        byoc: bool = True,
    ) -> None:
        self.workspace = os.path.abspath(workspace)
        self.num_sites = num_sites
        self.project_file = project_file
        self.sites_json = sites_json
        self.cases_per_site = cases_per_site
        self.size = size
        self.port = port
        self.byoc = byoc
        self.marker = uuid.uuid4().hex
        self.kits: Kits | None = None
        self.session: Any = None
        self.env = deployment_env(self.marker, home=os.path.join(self.workspace, "home"))

    # ---- steps a mode defines ----
    @abc.abstractmethod
    def prepare(self, project: dict[str, Any]) -> Kits:
        """Create the kits for ``project`` (already localized) and return them."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the server and the clients (returns once they are up)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask everything to stop in order (the caller then checks and kills what remains)."""

    def service_paths(self) -> list[str]:
        """Folders whose appearance in a command line marks a process of this run."""
        return [self.workspace]

    # ---- the run ----
    def _setup(self) -> None:
        leftovers = find_processes(None, self.service_paths())
        if leftovers:
            logger.warning("an earlier run in %s left %d process(es); stopping them", self.workspace, len(leftovers))
            for proc in leftovers:
                logger.warning("  %s", describe(proc))
            kill_processes(leftovers)
        make_private_dir(self.workspace)  # it will hold the federation's root CA and keys
        if not self.port:
            self.port = find_free_port()
        elif not port_is_free(self.port):
            raise DeploymentError(
                f"port {self.port} is in use (pids {listening_pids(self.port)}); choose another --port"
            )

    def _localized_project(self) -> dict[str, Any]:
        project = local_project(load_project(self.project_file), self.num_sites, self.port)
        return project

    def _site_configs(self, kits: Kits) -> None:
        sites_json = self.sites_json or make_demo_federation(
            os.path.join(self.workspace, "data"), kits.clients, self.cases_per_site, self.size
        )
        write_site_configs(sites_json, kits.client_dirs)
        stores = private_stores(kits.dir(kits.server))
        logger.info("%s: job store %s, snapshots %s (mode 0700)", kits.server, stores["jobs"], stores["snapshots"])
        if not self.byoc:
            for participant in kits.services:
                path = allow_fedbrats_classes(kits.dir(participant))
                logger.info("%s: allowed %s in %s", participant, ", ".join(FEDBRATS_CLASS_ALLOW_LIST), path)

    def run(self, job_dir: str, out_dir: str, *, num_rounds: int | None = None, timeout: float = 3600.0) -> RunReport:
        """Prepare, start, run ``job_dir``, download its result into ``out_dir``, stop and check.

        Whatever happens (an error, Ctrl-C, SIGTERM after :func:`raise_on_termination`), everything started is
        stopped, and processes still running afterwards are killed and reported.
        """
        report = RunReport(self.mode, self.workspace)
        timings = report.timings
        started = False
        job_id: list[str] = []
        try:
            self._setup()
            report.port = self.port
            t = time.monotonic()
            project = self._localized_project()
            self.kits = self.prepare(project)
            report.sites = list(self.kits.clients)
            self._site_configs(self.kits)
            staged = stage_job(job_dir, os.path.join(self.workspace, "jobs"), num_rounds=num_rounds, byoc=self.byoc)
            timings["prepare_s"] = round(time.monotonic() - t, 2)
            logger.info("prepared %s federation in %.1fs: %s", self.mode, timings["prepare_s"], self.kits.prod_dir)

            t = time.monotonic()
            started = True
            self.start()
            self.session = open_admin_session(self.kits)
            wait_for_clients(self.session, self.kits)
            timings["start_s"] = round(time.monotonic() - t, 2)
            logger.info(
                "server localhost:%d and clients %s up in %.1fs",
                self.port,
                ", ".join(self.kits.clients),
                timings["start_s"],
            )

            outcome = submit_and_follow(
                self.session,
                staged,
                server_dir=self.kits.dir(self.kits.server),
                timeout=timeout,
                on_submit=job_id.append,
            )
            report.job_id, report.status = outcome.job_id, outcome.status
            timings["job_s"] = outcome.seconds
            timings["rounds"] = outcome.rounds
            t = time.monotonic()
            report.result_dir, report.global_model = download_result(self.session, outcome.job_id, out_dir)
            timings["download_s"] = round(time.monotonic() - t, 2)
            if not outcome.ok:
                report.error = f"job {outcome.job_id} ended with {outcome.status}; see {report.result_dir}"
        except KeyboardInterrupt as e:
            report.error = f"interrupted ({e or 'Ctrl-C'})"
            logger.warning("interrupted: stopping everything")
            self._abort(job_id)
        except Exception as e:
            report.error = str(e)
            logger.error("%s", e)
            self._abort(job_id)
        finally:
            self._shutdown(report, started)
            self._write_report(report, out_dir)
        return report

    def _abort(self, job_id: list[str]) -> None:
        if self.session is not None and job_id:
            try:
                self.session.abort_job(job_id[0])
            except Exception as e:  # the job may have ended already; stopping follows anyway
                logger.debug("abort of job %s: %s", job_id[0], e)

    def _shutdown(self, report: RunReport, started: bool) -> None:
        with signals_deferred():
            self._shutdown_now(report, started)

    def _shutdown_now(self, report: RunReport, started: bool) -> None:
        t = time.monotonic()
        if started:
            try:
                self.stop()
            except BaseException as e:  # keep going: what remains is killed below
                logger.error("orderly stop failed (%s); asking each participant to stop", e)
                self._touch_shutdown()
        if self.session is not None:
            try:
                self.session.close()
            except Exception:
                pass
            self.session = None
        report.timings["stop_s"] = round(time.monotonic() - t, 2)
        cleanup = ensure_stopped(self.marker, self.service_paths(), self.port or None)
        report.timings["gone_s"] = round(time.monotonic() - t, 2)
        report.leftovers, report.port_free = cleanup.leftovers, cleanup.port_free
        if cleanup.clean:
            logger.info(
                "stopped in %.1fs; all processes gone and port %d free after %.1fs",
                report.timings["stop_s"],
                self.port,
                report.timings["gone_s"],
            )
        else:
            logger.error("not clean after the stop: killed %s; port free: %s", cleanup.leftovers, cleanup.port_free)

    def _touch_shutdown(self) -> None:
        if self.kits:
            for participant in self.kits.services:
                request_kit_stop(self.kits.dir(participant))

    @staticmethod
    def _write_report(report: RunReport, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "run_report.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(asdict(report), f, indent=2)
            f.write("\n")
        steps = [
            f"{label} {report.timings[key]}s"
            for key, label in (
                ("prepare_s", "prepare"),
                ("start_s", "start"),
                ("job_s", "job"),
                ("download_s", "download"),
                ("stop_s", "stop"),
                ("gone_s", "all gone after"),
            )
            if key in report.timings
        ]
        rounds = ", ".join(f"{r['round']}: {r['seconds']}s" for r in report.timings.get("rounds", []))
        if rounds:
            steps.append(f"rounds {rounds}")
        outcome = "OK" if report.ok else f"FAILED ({report.error or report.status or 'see the log'})"
        logger.info("%s run %s: %s; report %s", report.mode, outcome, ", ".join(steps), path)
