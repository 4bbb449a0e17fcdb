"""Processes of a deployment on this machine: the nvflare command, ports, starting kits, finding and stopping
what a run started (by the marker in their environment), and deferring Ctrl-C while a step must finish."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedbrats.data.site_config import SITE_CONFIG_ENV
from fedbrats.federated.memory import with_allocator_defaults

logger = logging.getLogger(f"fedbrats.{__name__}")

#: Environment variable set to a run's id in every process a run starts, to find them all again.
MARKER_ENV = "FEDBRATS_DEPLOYMENT_ID"


class DeploymentError(RuntimeError):
    """A deployment step failed; the message says which setting or log to check."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived: the run stops everything it started and ends."""


def raise_on_termination() -> None:
    """Turn SIGTERM into :class:`Interrupted`, so that a killed run still stops what it started (``finally``)."""

    def _handler(signum: int, _frame: Any) -> None:
        raise Interrupted(f"received signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """While stopping, a further Ctrl-C or SIGTERM is logged instead of cutting the clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(signum: int, _frame: Any) -> None:
        logger.warning("%s received while stopping; finishing the clean-up first", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- tools, ports -----------------------------------------------------------------------------------------------
def nvflare_cli() -> str:
    """The ``nvflare`` command of this environment (next to the running Python, else on ``PATH``).

    Raises:
        DeploymentError: it is not installed.
    """
    candidate = Path(sys.executable).with_name("nvflare")
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nvflare")
    if found:
        return found
    raise DeploymentError(
        f"the 'nvflare' command is neither next to {sys.executable} nor on PATH; install NVFlare in this environment "
        "(pip install -r requirements.txt)"
    )


def listening_pids(port: int) -> list[int]:
    """Processes listening on TCP ``port`` on any address (pid 0 when the owner cannot be seen)."""
    pids = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            pids.append(conn.pid or 0)
    return pids


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``port`` (sockets still in TIME_WAIT do not count)."""
    try:
        if listening_pids(port):
            return False
    except psutil.AccessDenied:
        pass
    for address in (host, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def find_free_port(host: str = "127.0.0.1", avoid: Iterable[int] = ()) -> int:
    """A TCP port nothing listens on now (the OS picks it; it is free at run time, not reserved)."""
    avoid = set(avoid)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in avoid and port_is_free(port, host):
            return port
    raise DeploymentError(f"found no free TCP port on {host}")


def wait_for_listener(port: int, host: str, timeout: float, what: str, log_hint: str = "") -> float:
    """Wait until something accepts connections on ``host:port``; return the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return time.monotonic() - started
        time.sleep(0.5)
    raise DeploymentError(
        f"{what} is not listening on {host}:{port} after {timeout:.0f}s; check that the port is free and allowed, "
        f"and the log {log_hint or 'of ' + what}"
    )


# ---- processes --------------------------------------------------------------------------------------------------
def deployment_env(marker: str, home: str | None = None) -> dict[str, str]:
    """Environment for everything a run starts: tagged with ``marker``, this Python first on ``PATH``.

    ``FEDBRATS_SITE_CONFIG`` is removed, so that each site reads its own ``local/fedbrats_site.json``; the
    allocator settings of :data:`fedbrats.federated.memory.ALLOCATOR_ENV` are added where unset. ``home``
    gives the NVFlare CLI a private home (``nvflare poc`` writes ``~/.nvflare/config.conf``).
    """
    env = dict(os.environ)
    with_allocator_defaults(env)
    env.pop(SITE_CONFIG_ENV, None)
    env[MARKER_ENV] = marker
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if home:
        os.makedirs(home, exist_ok=True)
        env["HOME"] = home
    return env


def find_processes(marker: str | None = None, paths: Iterable[str] = ()) -> list[psutil.Process]:
    """Processes tagged with ``marker``, or NVFlare processes whose command line names one of ``paths``.

    The second test finds what an earlier, killed run left (another id); it only matches NVFlare's own processes
    (``nvflare`` modules or a kit's ``startup/`` scripts), not, say, an editor open on a log. This process and its
    parents are never included.
    """
    paths = [os.path.abspath(p) for p in paths]
    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in own:
            continue
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if any(p in cmdline for p in paths) and ("nvflare" in cmdline or "/startup/" in cmdline):
                found.append(proc)
                continue
            if marker and proc.environ().get(MARKER_ENV) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(proc: psutil.Process) -> str:
    """``pid: command line`` of a process (for reports)."""
    try:
        return f"{proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"{proc.pid}: (gone)"


def kill_processes(procs: Sequence[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to each process."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


@dataclass
class CleanupReport:
    """What was left after a run had stopped its federation.

    Attributes:
        leftovers: processes still running after the orderly stop (killed then), as ``pid: command``.
        port_free: whether the server port was free at the end.
        seconds: time from the stop request until everything was gone.
    """

    leftovers: list[str] = field(default_factory=list)
    port_free: bool = True
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """Nothing had to be killed and the port is free."""
        return not self.leftovers and self.port_free


def ensure_stopped(marker: str, paths: Iterable[str], port: int | None, timeout: float = 45.0) -> CleanupReport:
    """Wait for a run's processes to end and its port to be free; kill and report what remains.

    Args:
        marker: the run's id (see :data:`MARKER_ENV`).
        paths: the run's workspace folders (a process naming one belongs to the run).
        port: the server port, or ``None``.
        timeout: seconds to wait for the orderly stop before killing.
    """
    paths = list(paths)
    started = time.monotonic()
    report = CleanupReport()
    while True:
        procs = find_processes(marker, paths)
        port_free = port is None or port_is_free(port)
        if not procs and port_free:
            break
        if time.monotonic() - started > timeout:
            report.leftovers = [describe(p) for p in procs]
            if procs:
                logger.warning("%d process(es) still running %.0fs after the stop; killing them:", len(procs), timeout)
                for line in report.leftovers:
                    logger.warning("  left behind: %s", line)
                kill_processes(procs)
            break
        time.sleep(0.5)
    if port is not None:
        deadline = time.monotonic() + 10
        while not port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        report.port_free = port_is_free(port)
        if not report.port_free:
            owners = listening_pids(port)
            logger.error("port %d is still in use after the stop (listening pids %s)", port, owners)
    report.seconds = round(time.monotonic() - started, 2)
    return report


def start_kit(kit_dir: str, env: Mapping[str, str], timeout: float = 60.0) -> None:
    """Run a server or client kit's ``startup/start.sh`` (it starts the participant in the background).

    Output goes to ``<kit>/console.log``; the participant's own log is ``<kit>/log.txt``.
    """
    script = os.path.join(kit_dir, "startup", "start.sh")
    if not os.path.isfile(script):
        raise DeploymentError(f"{script} does not exist: is {kit_dir} a server or client startup kit?")
    with open(os.path.join(kit_dir, "console.log"), "a", encoding="utf-8") as out:
        subprocess.run(
            ["bash", script],
            cwd=kit_dir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            start_new_session=True,
            check=True,
        )


def request_kit_stop(kit_dir: str) -> None:
    """Ask a participant's supervisor loop (``sub_start.sh``) to stop it: create ``<kit>/shutdown.fl``."""
    Path(kit_dir, "shutdown.fl").touch()
