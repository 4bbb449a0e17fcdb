"""The controller's round events: the writer, the readers (follower, benchmarks' timeline) and the deployment's
follower that logs them."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from deploy.follow import ServerProgressFollower
from fedbrats.federated.events import (
    EventFollower,
    RoundEventWriter,
    describe,
    is_problem,
    read_events,
)


def _clock(start: float = 100.0, step: float = 1.0):
    t = [start - step]

    def tick() -> float:
        t[0] += step
        return t[0]

    return tick


def test_writer_appends_one_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "round_events.jsonl"
    writer = RoundEventWriter(str(path), clock=_clock())
    writer.write("run_start", None, num_rounds=2)
    writer.write("round_end", 0, seconds=np.float32(1.5), aggregated={"val_mean_dice": np.float64(0.25)})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"time": 100.0, "event": "run_start", "round": None, "num_rounds": 2},
        {"time": 101.0, "event": "round_end", "round": 0, "seconds": 1.5, "aggregated": {"val_mean_dice": 0.25}},
    ]


def test_writer_refuses_unknown_events_and_reserved_fields(tmp_path: Path) -> None:
    writer = RoundEventWriter(str(tmp_path / "e.jsonl"))
    with pytest.raises(ValueError, match="event"):
        writer.write("round_started", 0)
    with pytest.raises(ValueError, match="time"):
        writer.write("round_end", 0, time=3.0)
    with pytest.raises(ValueError, match="path"):
        RoundEventWriter("")
    assert not (tmp_path / "e.jsonl").exists()


def test_writer_lines_stay_whole_across_threads(tmp_path: Path) -> None:
    """Results arrive on NVFlare's threads: concurrent writes must not interleave within a line."""
    path = tmp_path / "e.jsonl"
    writer = RoundEventWriter(str(path))

    def write_many(site: str) -> None:
        for _ in range(200):
            writer.write("result_received", 0, task="train", site=site, usable=True, reason=None, pad="x" * 500)

    threads = [threading.Thread(target=write_many, args=(f"site-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = read_events(str(path))
    assert len(events) == 800
    assert {e["site"] for e in events} == {"site-0", "site-1", "site-2", "site-3"}


def test_follower_returns_only_complete_new_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "e.jsonl"
    follower = EventFollower(str(path))
    assert follower.poll() == []  # no file yet
    path.write_text('{"time": 1, "event": "run_start", "round": null}\n{"time": 2, "event": "round_st')
    assert [e["event"] for e in follower.poll()] == ["run_start"]
    with path.open("a") as f:
        f.write('art", "round": 0}\nnot json\n{"time": 3, "event": "round_end", "round": 0}\n')
    with caplog.at_level(logging.WARNING):
        assert [e["event"] for e in follower.poll()] == ["round_start", "round_end"]
    assert "not JSON" in caplog.text
    assert follower.poll() == []
    assert read_events(str(tmp_path / "missing.jsonl")) == []


def test_describe_and_problems() -> None:
    rejected = {"event": "result_received", "round": 3, "task": "train", "site": "site-2", "usable": False,
                "reason": "NaN in weights"}  # fmt: skip
    assert is_problem(rejected) and "site-2" in describe(rejected) and "NaN in weights" in describe(rejected)
    fine = {"event": "results_collected", "round": 3, "task": "train", "usable": ["site-1"], "rejected": {},
            "left_out": []}  # fmt: skip
    assert not is_problem(fine)
    assert is_problem(dict(fine, left_out=["site-3"])) and "site-3" in describe(dict(fine, left_out=["site-3"]))
    assert is_problem(dict(fine, usable=[]))  # a training round without a usable update
    assert not is_problem(dict(fine, task="validate", usable=[]))
    assert describe({"event": "round_end", "round": 1, "seconds": 2.5}) == "round 1 done in 2.5s"
    assert is_problem({"event": "job_stop", "round": 0, "reason": "x"})


def test_server_progress_follower_times_rounds_from_events(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The deployment's follower: round times from the events, NVFlare's own errors from the log, nothing parsed
    from the controller's log lines."""
    writer = RoundEventWriter(str(tmp_path / "round_events.jsonl"), clock=_clock(step=0.5))
    writer.write("run_start", None, num_rounds=2, aggregation="fedavg")
    writer.write("round_start", 0, targets=["site-1"])
    writer.write("task_dispatched", 0, task="train", targets=["site-1"])
    writer.write("result_received", 0, task="train", site="site-1", usable=False, reason="bad shape")
    (tmp_path / "log.txt").write_text(
        "2026-01-01 10:00:00,000 - FedBratsController - ERROR - [identity=x] - round 0 done in 9.0s\n"
        "2026-01-01 10:00:00,100 - ServerRunner - ERROR - [identity=x] - task router failed\n"
        "2026-01-01 10:00:00,200 - ServerRunner - INFO - all fine\n"
    )
    follower = ServerProgressFollower(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="fedbrats.deploy.follow"):
        follower.poll()
        assert follower.rounds == []
        writer.write("round_end", 0, seconds=1.4, aggregated={})
        follower.poll()
    assert follower.rounds == [{"round": 0, "seconds": 1.5}]  # round_start at 100.5, round_end at 102.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("site-1" in m and "bad shape" in m for m in warnings)
    assert "server error (ServerRunner): task router failed" in warnings
    assert not any("9.0s" in m for m in warnings), "the controller's own log lines are not followed"
    assert any(m == "server: start: 2 rounds, aggregation fedavg" for m in caplog.messages)
    with pytest.raises(ValueError, match="run_dir"):
        ServerProgressFollower("")
