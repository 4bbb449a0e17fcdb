"""The admin session: connect as the project admin, wait for the sites, submit and follow a job, download it."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.follow import ServerProgressFollower
from deploy.kits import Kits, admin_endpoint
from deploy.processes import DeploymentError
from fedbrats.runs import GLOBAL_MODEL_FILE

logger = logging.getLogger(f"fedbrats.{__name__}")

#: Job statuses after which a job does no more work (NVFlare reports ``FINISHED:<how>`` for ended jobs).
_TERMINAL = ("FINISHED", "ABORTED", "ABANDONED", "FAILED")


# ---- the admin session: submit, follow, download -----------------------------------------------------------------
def open_admin_session(kits: Kits, timeout: float = 30.0) -> Any:
    """Log in as the project admin with its startup kit (mutual TLS); return the NVFlare ``Session``.

    Raises:
        DeploymentError: the server cannot be reached or refuses the login; the message names host and port.
    """
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    admin_dir = kits.dir(kits.admin)
    host, port = admin_endpoint(admin_dir)
    try:
        return new_secure_session(kits.admin, admin_dir, timeout=timeout)
    except Exception as e:
        raise DeploymentError(
            f"cannot log in to the FL server at {host}:{port} as {kits.admin} (kit {admin_dir}): {e}. Check that the "
            f"server is running (its log: {kits.dir(kits.server)}/log.txt), that {host} resolves and port {port} is "
            "reachable (firewall), and that the admin kit comes from the same provisioning as the server "
            "(same startup/rootCA.pem)"
        ) from e


def connected_clients(session: Any) -> list[str]:
    """Names of the clients connected to the server now."""
    return sorted(c.name for c in session.get_system_info().client_info)


def wait_for_clients(session: Any, kits: Kits, timeout: float = 60.0) -> float:
    """Wait until every client of ``kits`` is connected; return the seconds waited."""
    started = time.monotonic()
    expected = set(kits.clients)
    connected: set[str] = set()
    while time.monotonic() - started < timeout:
        connected = set(connected_clients(session))
        if expected <= connected:
            return time.monotonic() - started
        time.sleep(1.0)
    host, port = admin_endpoint(kits.dir(kits.admin))
    missing = sorted(expected - connected)
    logs = ", ".join(os.path.join(kits.dir(c), "log.txt") for c in missing)
    raise DeploymentError(
        f"clients {missing} did not connect to the server {host}:{port} within {timeout:.0f}s; check their logs "
        f"({logs}) for TLS/certificate or connection errors, that they reach {host}:{port}, and that their kits come "
        "from the same provisioning as the server"
    )


@dataclass
class JobOutcome:
    """How a job ended.

    Attributes:
        job_id: NVFlare's id of the job.
        status: final status (``FINISHED:COMPLETED`` when it went well).
        seconds: from submission until the end was seen.
        rounds: per training round, its duration (from the controller's round events).
    """

    job_id: str
    status: str
    seconds: float
    rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The job completed."""
        return self.status == "FINISHED:COMPLETED"


def is_terminal(status: str) -> bool:
    """Whether a job status is final."""
    return any(status.startswith(t) for t in _TERMINAL)


def submit_and_follow(
    session: Any,
    job_dir: str,
    *,
    server_dir: str | None = None,
    timeout: float = 3600.0,
    poll: float = 2.0,
    on_submit: Any = None,
) -> JobOutcome:
    """Submit a job and follow it to its end, logging its status changes and the workflow's round lines.

    Args:
        session: an admin session (:func:`open_admin_session`).
        job_dir: the (staged) job folder.
        server_dir: the server's kit folder when it is on this machine (for the per-round progress).
        timeout: seconds before the job is aborted.
        poll: seconds between status checks.
        on_submit: called with the job id once submitted (lets the caller abort it on interruption).

    Raises:
        DeploymentError: the job did not end within ``timeout`` (it is aborted).
    """
    started = time.monotonic()
    job_id = session.submit_job(job_dir)
    logger.info("submitted %s as job %s", os.path.basename(job_dir), job_id)
    if on_submit:
        on_submit(job_id)
    follower = ServerProgressFollower(os.path.join(server_dir, job_id)) if server_dir else None
    status = ""
    while True:
        meta = session.get_job_meta(job_id)
        if follower:
            follower.poll()
        if meta.get("status") != status:
            status = meta.get("status", "?")
            logger.info("job %s: %s (%.1fs)", job_id, status, time.monotonic() - started)
        if is_terminal(status):
            break
        if time.monotonic() - started > timeout:
            session.abort_job(job_id)
            raise DeploymentError(f"job {job_id} did not finish within {timeout:.0f}s (--timeout); it was aborted")
        time.sleep(poll)
    if follower:
        follower.poll()
    outcome = JobOutcome(job_id, status, round(time.monotonic() - started, 2), follower.rounds if follower else [])
    if not outcome.ok:
        logger.error("job %s ended with %s; details: %s", job_id, status, meta.get("job_deploy_detail", ""))
    return outcome


def download_result(session: Any, job_id: str, out_dir: str) -> tuple[str, str | None]:
    """Download a job's result into ``out_dir``; return its folder and the global model's path (if any)."""
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(os.path.abspath(out_dir), job_id)
    shutil.rmtree(target, ignore_errors=True)
    result_dir = session.download_job_result(job_id, destination=os.path.abspath(out_dir))
    models = sorted(Path(result_dir).rglob(GLOBAL_MODEL_FILE))
    model = str(models[0]) if models else None
    if model:
        logger.info("global model: %s", model)
    else:
        logger.error("the result of job %s (%s) holds no %s", job_id, result_dir, GLOBAL_MODEL_FILE)
    return result_dir, model
