"""A server killed mid-job resumes from its last saved global model, round counter and prototypes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedbrats.simulate import simulate

pytestmark = pytest.mark.integration

TINY = ["--set", "epochs_per_round=1", "--set", "data.roi_size=[16,16,16]", "--set", "data.batch_size=1"]


def _completed_rounds(run_dir: str) -> list[int]:
    try:
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
            return [r["round"] for r in json.load(f) if not r.get("final_validation")]
    except (OSError, json.JSONDecodeError):
        return []


def test_kill_and_resume(tiny_federation: str, tmp_path) -> None:
    first = tmp_path / "first"
    cmd = [sys.executable, "-m", "fedbrats.cli", "simulate", "fedkd", "--workspace", str(first)]
    cmd += ["--sites", tiny_federation, "--rounds", "4", *TINY, "--set", "method_args.min_prototype_cases=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = str(first / "sim" / "server" / "simulate_job")
    deadline = time.monotonic() + 240
    try:
        while len(_completed_rounds(run_dir)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: server and sites, as a crash would
        proc.wait()
    done = _completed_rounds(run_dir)
    assert len(done) >= 2, "the first run did not get far enough to be killed mid-job"
    assert len(done) < 4, "the first run finished before it could be killed"
    prototypes_before = np.load(os.path.join(run_dir, "server_state.npz"))["global_prototypes"]

    result = simulate(
        "fedkd",
        str(tmp_path / "second"),
        sites_file=tiny_federation,
        num_rounds=4,
        training={
            "epochs_per_round": 1,
            "data": {"roi_size": [16, 16, 16], "batch_size": 1},
            "method_args": {"min_prototype_cases": 1},
        },
        controller_args={"resume_from": run_dir},
    )
    rounds = [r["round"] for r in result.history if not r.get("final_validation")]
    assert rounds == [0, 1, 2, 3], f"rounds after resume: {rounds}"
    assert rounds[: len(done)] == done, "completed rounds must be kept, not redone"
    log = open(tmp_path / "second" / "simulator.log", encoding="utf-8").read()
    assert f"continuing at round {len(done)}" in log
    assert (
        prototypes_before.shape == np.load(os.path.join(result.run_dir, "server_state.npz"))["global_prototypes"].shape
    )
