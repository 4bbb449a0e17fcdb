"""The machine a benchmark ran on, library versions, and a memory sampler of a process tree."""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import psutil

logger = logging.getLogger(f"fedbrats.{__name__}")

#: Libraries whose versions go into every report.
LIBRARIES: tuple[str, ...] = ("torch", "monai", "nvflare", "numpy", "psutil", "nibabel", "matplotlib")


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> list[dict[str, Any]]:
    """CUDA devices torch sees (name, memory in GiB, compute capability); empty on a CPU-only machine."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return out


def library_versions() -> dict[str, str]:
    """Python and the versions of :data:`LIBRARIES` (``"not installed"`` where absent)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPUs, OS, library versions and the current load average."""
    import torch

    vm = psutil.virtual_memory()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(vm.total / 2**30, 1),
        "ram_available_gib_at_start": round(vm.available / 2**30, 1),
        "gpus": gpu_info(),
        "cuda_available": bool(torch.cuda.is_available()),
        "torch_default_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python_executable": sys.executable,
        "versions": library_versions(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def load_average() -> float:
    """The 1-minute load average (how busy the machine was around a measurement)."""
    return round(os.getloadavg()[0], 2)


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent working (all cores), since boot."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)
    return sum(t) - idle - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of every descendant it (or they) waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class OtherWork:
    """How much CPU work other than the benchmark's own ran on the machine meanwhile.

    The load average cannot tell: the benchmark itself runs more processes than there are cores. Instead: the
    machine's busy CPU time minus this process's and its reaped descendants' CPU time, per second of wall time.
    Call :meth:`cores` when every process started since has ended (it counts descendants only once reaped).

    Args:
        busy_seconds: the machine's busy CPU seconds (default: from ``psutil``); tests pass a controlled one.
        own_seconds: CPU seconds of this process and its reaped descendants (default: ``os.times``).
        clock: wall-clock seconds (default: ``time.monotonic``).
    """

    busy_seconds: Callable[[], float] = _busy_cpu_seconds
    own_seconds: Callable[[], float] = _own_cpu_seconds
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.busy0 = self.busy_seconds()
        self.own0 = self.own_seconds()
        self.wall0 = self.clock()

    def cores(self) -> float:
        """Average number of cores other work kept busy since this object was made (0 on an idle machine)."""
        wall = max(self.clock() - self.wall0, 1e-6)
        other = (self.busy_seconds() - self.busy0) - (self.own_seconds() - self.own0)
        return round(max(other, 0.0) / wall, 3)


@dataclass
class Sample:
    """One reading of one process.

    Attributes:
        t: wall-clock time (``time.time()``).
        pid: process id.
        ppid: parent process id.
        rss: resident set size in bytes.
        cmdline: the process's command line, joined by spaces.
    """

    t: float
    pid: int
    ppid: int
    rss: int
    cmdline: str


def live_tree_members(
    root_pid: int, known: dict[int, psutil.Process], include_root: bool = False
) -> list[psutil.Process]:
    """The processes of ``root_pid``'s tree still running: its current descendants (and itself with
    ``include_root``) plus every process of ``known``, which this call extends with the descendants it sees.

    A process once seen stays a member until it ends: one whose parent exits is re-parented outside the tree and
    would otherwise drop out of the readings while it still works.
    """
    try:
        root = psutil.Process(root_pid)
        current = root.children(recursive=True)
    except psutil.NoSuchProcess:
        current = []
    else:
        if include_root:
            current = [root, *current]
    for proc in current:
        known.setdefault(proc.pid, proc)
    # is_running() also compares the start time, so a reused pid is not mistaken for the old process.
    return [proc for proc in known.values() if proc.is_running()]


@dataclass
class ProcessSampler:
    """Read the RSS of every descendant of ``root_pid`` every ``interval`` seconds, in a background thread.

    Use as a context manager around the work to observe. The simulator starts a launcher, which forks the
    server process (and a multiprocessing manager); the server process starts one ``simulator_worker`` process
    per client. :func:`simulator_roles` names them afterwards.

    Args:
        root_pid: the process whose descendants are read (default: this one).
        interval: seconds between readings.
        include_root: read ``root_pid`` itself too.
    """

    root_pid: int = field(default_factory=os.getpid)
    interval: float = 0.5
    include_root: bool = False
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._known: dict[int, psutil.Process] = {}  # every process once seen (see live_tree_members)

    @staticmethod
    def _cmdline(proc: psutil.Process) -> str:
        # Read every time, never cached: a process caught between fork and exec still shows its parent's command
        # line (a simulator client then looked like a copy of the launcher and went unnamed).
        return " ".join(proc.cmdline())

    def sample_once(self) -> None:
        """Take one reading of every process of the tree (processes that vanish meanwhile are skipped)."""
        procs = live_tree_members(self.root_pid, self._known, self.include_root)
        now = time.time()
        for proc in procs:
            try:
                with proc.oneshot():
                    self.samples.append(Sample(now, proc.pid, proc.ppid(), proc.memory_info().rss, self._cmdline(proc)))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessSampler:
        self._thread = threading.Thread(target=self._run, name="bench-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def by_label(self, label_of: Callable[[Sample], str | None]) -> dict[str, list[tuple[float, int]]]:
        """``label -> [(t, rss), ...]`` summed over the processes sharing a label at each reading time."""
        sums: dict[str, dict[float, int]] = {}
        for s in self.samples:
            label = label_of(s)
            if label is None:
                continue
            series = sums.setdefault(label, {})
            series[s.t] = series.get(s.t, 0) + s.rss
        return {label: sorted(series.items()) for label, series in sums.items()}


def _client_name(cmdline: str) -> str | None:
    parts = cmdline.split()
    if "--client" in parts:
        i = parts.index("--client")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def simulator_roles(samples: list[Sample]) -> dict[int, str]:
    """Name each process of a simulator run: ``server``, ``client:<site>``, ``launcher`` or ``manager``.

    Clients are the ``simulator_worker`` processes (``--client NAME`` on their command line); the server is
    their parent (the forked ``run_process`` that hosts the server and the client-runner threads); the
    launcher is the ``nvflare.cli simulator`` process started by :func:`fedbrats.simulate.simulate`;
    any other forked copy of the launcher is multiprocessing's manager.
    """
    roles: dict[int, str] = {}
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for s in samples:
        parents.setdefault(s.pid, s.ppid)  # the parent it was started by (a re-parented process shows another later)
        # A client read between fork and exec shows its parent's command line; its worker line wins.
        if s.pid not in cmdlines or "simulator_worker" in s.cmdline:
            cmdlines[s.pid] = s.cmdline
    server_pids: set[int] = set()
    for pid, cmd in cmdlines.items():
        if "simulator_worker" in cmd:
            roles[pid] = f"client:{_client_name(cmd) or pid}"
            server_pids.add(parents[pid])
    for pid in server_pids:
        roles[pid] = "server"
    sim_pids = {pid for pid, cmd in cmdlines.items() if "nvflare.cli" in cmd and "simulator" in cmd}
    for pid in sim_pids - server_pids:
        # The launcher's own parent is outside the simulator; its forked children have the launcher as parent.
        roles[pid] = "manager" if parents.get(pid) in sim_pids else "launcher"
    return roles
