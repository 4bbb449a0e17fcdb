"""Where the CPU of a command's process tree goes, thread by thread: the busiest thread of each process (in a site,
its training loop) against all its other threads (in NVFlare: polling, heartbeats, streaming, cleanup timers).

The federated overhead (docs/results.md) is measured as wall time against the same work without NVFlare; this
tool says how much CPU NVFlare's own threads take meanwhile, which on a machine whose cores are all busy training
slows the training down. It samples ``/proc/<pid>/task/<tid>/stat`` (Linux) of the command and every descendant
(:func:`benchmarks.system.live_tree_members`) once per ``interval`` and keeps each thread's last cumulative CPU
time, so a thread that ends between samples loses at most one interval.

Usage::

    python benchmarks/threads.py --out OUT/threads.json -- fedbrats simulate fedavg --workspace W --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from benchmarks.system import live_tree_members

logger = logging.getLogger("benchmarks.threads")

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """Cumulative user + system CPU seconds of each thread of process ``pid`` (empty if it has gone)."""
    result: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
                # The command name (field 2) may hold spaces or parentheses; the fields after its last ")" are fixed.
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        result[int(tid)] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    return result


@dataclass
class ProcessThreads:
    """The threads seen in one process and their last cumulative CPU seconds."""

    pid: int
    command: str
    cpu: dict[int, float] = field(default_factory=dict)
    max_threads: int = 0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.cpu.values(), reverse=True)
        return {
            "pid": self.pid,
            "command": self.command,
            "busiest_thread_cpu_s": round(ordered[0], 2) if ordered else 0.0,
            "other_threads_cpu_s": round(sum(ordered[1:]), 2),
            "threads_seen": len(self.cpu),
            "max_threads_at_once": self.max_threads,
        }


def sample_command(command: Sequence[str], interval: float = 1.0) -> dict[str, Any]:
    """Run ``command`` to its end, sampling its process tree's threads every ``interval`` seconds.

    Returns:
        ``wall_s``, ``returncode``, ``processes`` (one :meth:`ProcessThreads.summary` each) and the totals
        ``busiest_threads_cpu_s`` and ``other_threads_cpu_s``.

    Raises:
        ValueError: an empty command or a non-positive interval.
    """
    if not command:
        raise ValueError("command must not be empty")
    if interval <= 0:
        raise ValueError(f"interval must be > 0, got {interval}")
    started = time.monotonic()
    proc = subprocess.Popen(list(command))
    seen: dict[int, ProcessThreads] = {}
    known: dict[int, psutil.Process] = {}
    while True:
        done = proc.poll() is not None
        for member in live_tree_members(proc.pid, known, include_root=True):
            entry = seen.get(member.pid)
            if entry is None:
                try:
                    label = " ".join(member.cmdline())
                except psutil.Error:
                    label = ""
                entry = seen[member.pid] = ProcessThreads(member.pid, label)
            cpu = thread_cpu_seconds(member.pid)
            entry.cpu.update(cpu)
            entry.max_threads = max(entry.max_threads, len(cpu))
        if done:
            break
        time.sleep(interval)
    processes = [p.summary() for p in seen.values() if p.cpu]
    return {
        "command": list(command),
        "interval_s": interval,
        "wall_s": round(time.monotonic() - started, 2),
        "returncode": proc.returncode,
        "processes": processes,
        "busiest_threads_cpu_s": round(sum(p["busiest_thread_cpu_s"] for p in processes), 2),
        "other_threads_cpu_s": round(sum(p["other_threads_cpu_s"] for p in processes), 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write (refused if it exists)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the command to measure after --")
    if os.path.exists(a.out):
        p.error(f"--out {a.out} exists; choose another file")
    result = sample_command(command, a.interval)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    for proc in result["processes"]:
        logger.info(
            "pid %d: busiest thread %.1f s, other threads %.1f s (%d threads, at most %d at once): %s",
            proc["pid"],
            proc["busiest_thread_cpu_s"],
            proc["other_threads_cpu_s"],
            proc["threads_seen"],
            proc["max_threads_at_once"],
            proc["command"][-100:],
        )
    logger.info(
        "wall %.1f s; busiest threads %.1f s CPU; all other threads %.1f s CPU; written to %s",
        result["wall_s"],
        result["busiest_threads_cpu_s"],
        result["other_threads_cpu_s"],
        a.out,
    )
    return result["returncode"]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
