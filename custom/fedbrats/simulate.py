"""Run a job in NVFlare's simulator with chosen overrides, and check that it really trained.

``fedbrats simulate fedkd --rounds 20 --set method_args.rcl_weight=0`` is how the results and ablations are
produced: the job is exported from its recipe (:class:`fedbrats.recipe.FedBratsRecipe`) with the overrides into the
workspace, so the committed job folders stay the single definition of each method. (``python -m fedbrats.job JOB
--env sim`` runs the same recipe in NVFlare's ``SimEnv``; this runner adds the checks below.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import fedbrats.federated.methods  # noqa: F401 - registers the methods' own networks and strategies
from fedbrats.data.federation import POOLED_SITE
from fedbrats.data.site_config import SITE_CONFIG_ENV, federation_sites_file
from fedbrats.federated.events import JOB_STOP, RESULT_RECEIVED, read_events
from fedbrats.federated.memory import with_allocator_defaults
from fedbrats.jobgen import JOBS, JobOptions
from fedbrats.recipe import write_job
from fedbrats.runs import RunFolder

logger = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """Where a simulated run left its results.

    Attributes:
        run_dir: the server's run folder (``metrics.json``, ``model_spec.json``, ``app_server/*.pt``).
        seconds: wall time of the simulator.
        history: the per-round records of ``metrics.json``.
    """

    run_dir: str
    seconds: float
    history: list[dict[str, Any]]

    @property
    def best_model(self) -> str:
        return RunFolder(self.run_dir).best_global_model


def simulator_workspace(workspace: str) -> str:
    """The simulator's workspace inside a :func:`simulate` workspace (one folder per site and the server)."""
    return os.path.join(workspace, "sim")


def simulated_run_dir(workspace: str) -> str:
    """The server's run folder of a job :func:`simulate` ran in ``workspace`` (the simulator's own layout)."""
    return simulated_site_run_dir(workspace, "server")


def simulated_site_run_dir(workspace: str, site: str) -> str:
    """A site's run folder of a job :func:`simulate` ran in ``workspace`` (``payload_audit.jsonl``,
    ``site_events.jsonl``)."""
    return os.path.join(simulator_workspace(workspace), site, "simulate_job")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["method_args.rcl_weight=0", "data.roi_size=[16,16,16]"]`` -> nested dict (values parsed as JSON
    where they parse, else kept as strings)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def keep_resume_source(run_dir: str, workspace: str) -> str:
    """Copy what a resume needs out of ``run_dir``: the simulator wipes its workspace, which may hold it."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"resume_from={run_dir!r} is not a folder")
    target = os.path.join(os.path.abspath(workspace), f"resume_source_{int(time.time())}")
    os.makedirs(RunFolder(target).app_server, exist_ok=True)
    for rel in RunFolder.RESUME_FILES:
        src = os.path.join(run_dir, rel)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(target, rel))
    return target


#: What NVFlare's simulator logs when a simulated site's process is gone (seen once in about fifteen 16-site runs on
#: 2 cores: "Communication error with client site-12: [Errno 104] Connection reset by peer" as the sites started).
#: The simulator never reports such a site as disconnected, so a round that waits for every site waits forever.
_SITE_LOST = re.compile(r"(?:Communication error with client|Subprocess died for client) ([\w.-]+)")


class SimulatedSiteLostError(RuntimeError):
    """NVFlare's simulator lost a site's process while the job needed every site; the run was stopped.

    Attributes:
        site: the lost site.
    """

    def __init__(self, site: str, line: str, log_file: str) -> None:
        super().__init__(
            f"the simulator lost site {site} ({line.strip()!r}); the job needs every site, so the run was stopped "
            f"instead of waiting for it forever. This is NVFlare's simulator, not the site's data: run again. "
            f"Log: {log_file}"
        )
        self.site = site


def _run_simulator(cmd: list[str], env: dict[str, str], log_file: str, sim_ws: str, stop_on_lost_site: bool) -> int:
    """Run the simulator with its output in ``log_file``, watching the log for lost sites; returns the exit code.

    Raises:
        SimulatedSiteLostError: a site's process was lost and ``stop_on_lost_site`` (every site is needed).
    """
    with open(log_file, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pending = ""
    with open(log_file, encoding="utf-8", errors="replace") as reader:
        while True:
            try:
                returncode: int | None = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                returncode = None
            pending += reader.read()
            lines, pending = pending.split("\n")[:-1], pending.split("\n")[-1]
            for line in lines:
                lost = _SITE_LOST.search(line)
                if lost is None:
                    continue
                if stop_on_lost_site and returncode is None:
                    _stop_simulator(proc, sim_ws)
                    raise SimulatedSiteLostError(lost.group(1), line, log_file)
                logger.warning("the simulator lost site %s: %s", lost.group(1), line.strip())
            if returncode is not None:
                return returncode


def _stop_simulator(proc: subprocess.Popen, sim_ws: str, grace: float = 20.0) -> None:
    """Stop the simulator's process group, then any of its site workers (they run in sessions of their own)."""
    import psutil

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    workspace = os.path.abspath(sim_ws)
    for worker in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(worker.info["cmdline"] or [])
        if "simulator_worker" in cmdline and workspace in cmdline:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


def _failure_reason(events_file: str) -> str:
    """Why the server stopped the job (or the first rejected site update), from the controller's round events
    (``round_events.jsonl``), as ": <reason>" or ""."""
    events = read_events(events_file)
    for event in events:
        if event["event"] == JOB_STOP:
            return f": {event.get('reason')}"
    for event in events:
        if event["event"] == RESULT_RECEIVED and event.get("task") == "train" and not event.get("usable"):
            return f": round {event.get('round')}: rejected the update of {event.get('site')}: {event.get('reason')}"
    return ""


def check_job_options(job_dir: str) -> None:
    """Check a generated job's training options, method and aggregation arguments before the simulator starts.

    Each site would refuse an unknown option itself, but only after the simulator started, and the user would see
    "aggregated no site update"; the same checks here name the option at once.

    Raises:
        ValueError: an unknown or invalid training option, method argument or aggregation argument (named).
    """
    from fedbrats.federated.client.trainer import TrainConfig
    from fedbrats.federated.methods import build_method
    from fedbrats.federated.server.aggregation import STRATEGIES

    config_dir = os.path.join(job_dir, "app", "config")
    with open(os.path.join(config_dir, "config_fed_client.json"), encoding="utf-8") as f:
        client = json.load(f)
    with open(os.path.join(config_dir, "config_fed_server.json"), encoding="utf-8") as f:
        server = json.load(f)
    try:
        training = client["executors"][0]["executor"]["args"].get("training", {})
        config = TrainConfig.from_dict(training)
        build_method(config.method, **config.method_args)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"job {os.path.basename(job_dir)}: {exc} (check the --set options)") from None
    for component in server.get("components", []):
        if component.get("id") == "aggregation":
            try:
                STRATEGIES.build(component["path"], component.get("args", {}))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"job {os.path.basename(job_dir)}: {exc} (check the --agg options)") from None


def site_names(sites_file: str, job: str) -> list[str]:
    """The clients to simulate: the pooled site for the centralized job, every other site otherwise."""
    with open(sites_file, encoding="utf-8") as f:
        sites = sorted(json.load(f)["sites"])
    if job == "centralized":
        if POOLED_SITE not in sites:
            raise ValueError(f"{sites_file} has no {POOLED_SITE!r} site; run `fedbrats pool-sites {sites_file}`")
        return [POOLED_SITE]
    return [s for s in sites if s != POOLED_SITE]


def simulate(
    options: JobOptions | str,
    workspace: str,
    *,
    sites_file: str | None = None,
    clients: list[str] | None = None,
    threads: int | None = None,
    log_file: str | None = None,
    **changes: Any,
) -> SimulationResult:
    """Export a job into ``workspace/jobs`` and run it in NVFlare's simulator, with the checks NVFlare lacks.

    This is the one way a job runs in the simulator here: ``fedbrats simulate``, ``python -m fedbrats.job JOB --env
    sim``, the experiment drivers and the benchmarks all call it. It names the option at fault before the simulator
    starts (:func:`check_job_options`), stops a run whose lost site the job waits for, and fails a run that
    aggregated no site update.

    Args:
        options: the run's :class:`~fedbrats.jobgen.JobOptions`, or a job's name (its defaults).
        workspace: folder for the generated job and the simulator workspace (``workspace/sim``).
        sites_file: the federation's ``sites.json`` (default: ``FEDBRATS_SITE_CONFIG``, else the embedded synthetic
            federation; see :func:`fedbrats.data.site_config.federation_sites_file`).
        clients: client names (default: from ``sites_file``: the pooled site for the centralized job).
        threads: clients run in parallel (default: all).
        log_file: where the simulator's output goes (default ``workspace/simulator.log``).
        changes: fields of :class:`~fedbrats.jobgen.JobOptions` to change (``num_rounds``, ``training``, ``seed``, ...).

    Raises:
        SimulatedSiteLostError: the simulator lost a site's process while the job needs every site (it would
            otherwise wait for that site forever).
        RuntimeError: the simulator failed, or no round aggregated a single site update.
        ValueError: a bad option (named).
    """
    changes = {k: v for k, v in changes.items() if v is not None}
    options = JobOptions(options, **changes) if isinstance(options, str) else options.replace(**changes)
    job = options.job
    sites_file = federation_sites_file(sites_file, f"simulate {job}")
    if options.controller_args.get("resume_from"):
        resume = keep_resume_source(options.controller_args["resume_from"], workspace)
        options = options.replace(controller_args={**options.controller_args, "resume_from": resume})
    clients = clients or site_names(sites_file, job)
    os.makedirs(workspace, exist_ok=True)
    job_dir = write_job(options, os.path.join(workspace, "jobs"))
    check_job_options(job_dir)
    sim_ws = simulator_workspace(workspace)
    log_file = log_file or os.path.join(workspace, "simulator.log")
    cmd = [sys.executable, "-m", "nvflare.cli", "simulator", job_dir, "-w", sim_ws, "-c", ",".join(clients)]
    cmd += ["-t", str(threads or len(clients))]
    env = dict(os.environ, **{SITE_CONFIG_ENV: sites_file})
    with_allocator_defaults(env)
    logger.info("simulating %s with %s (log: %s)", job, ",".join(clients), log_file)
    needed = options.min_clients if options.min_clients is not None else JOBS[job]["min_clients"]
    started = time.monotonic()
    every_site_needed = needed == 0 or needed >= len(clients)
    returncode = _run_simulator(cmd, env, log_file, sim_ws, stop_on_lost_site=every_site_needed)
    seconds = time.monotonic() - started
    run = RunFolder(simulated_run_dir(workspace))
    run_dir, metrics_file = run.path, run.metrics
    if returncode != 0 or not os.path.isfile(metrics_file):
        why = _failure_reason(run.round_events)
        raise RuntimeError(f"simulation of {job} failed (exit {returncode}){why}; see {log_file}")
    with open(metrics_file, encoding="utf-8") as f:
        history = json.load(f)
    if not any(r["sites"] for r in history if not r.get("final_validation")):
        raise RuntimeError(
            f"simulation of {job} aggregated no site update in any round{_failure_reason(run.round_events)}; "
            f"see {log_file}"
        )
    logger.info("%s finished in %.1fs; run dir %s", job, seconds, run_dir)
    return SimulationResult(run_dir, seconds, history)
