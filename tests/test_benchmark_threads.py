"""benchmarks/threads.py: per-thread CPU of a command's process tree."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.threads import main, sample_command, thread_cpu_seconds

# One thread spins for about 1.5 s of CPU while the main thread sleeps; a child process does the same.
_SPIN = (
    "import threading, time\n"
    "def spin():\n"
    "    end = time.thread_time() + 1.5\n"
    "    while time.thread_time() < end: pass\n"
    "t = threading.Thread(target=spin); t.start(); t.join()\n"
)


def test_the_busy_thread_is_the_busiest_and_its_cpu_is_counted() -> None:
    result = sample_command([sys.executable, "-c", _SPIN], interval=0.1)
    assert result["returncode"] == 0 and len(result["processes"]) == 1
    proc = result["processes"][0]
    assert proc["threads_seen"] >= 2
    # Sampled at most one interval before the thread ended; a loaded machine may delay the sampler, hence the margin.
    assert proc["busiest_thread_cpu_s"] >= 0.5
    assert proc["other_threads_cpu_s"] < proc["busiest_thread_cpu_s"]


def test_children_are_sampled_too() -> None:
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {_SPIN!r}], check=True)"
    result = sample_command([sys.executable, "-c", parent], interval=0.1)
    assert len(result["processes"]) == 2
    assert max(p["busiest_thread_cpu_s"] for p in result["processes"]) >= 0.5


def test_thread_cpu_of_a_gone_process_is_empty() -> None:
    assert thread_cpu_seconds(2**22 + 12345) == {}


def test_bad_arguments_and_an_existing_output_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="command"):
        sample_command([])
    with pytest.raises(ValueError, match="interval"):
        sample_command([sys.executable, "-c", "pass"], interval=0)
    out = tmp_path / "threads.json"
    out.write_text("{}")
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--", sys.executable, "-c", "pass"])
    assert out.read_text() == "{}"


def test_main_writes_the_result_and_returns_the_command_status(tmp_path) -> None:
    out = tmp_path / "sub" / "threads.json"
    assert main(["--out", str(out), "--interval", "0.1", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert json.loads(out.read_text())["returncode"] == 3
