"""A site's own events: the training script's ``site_events.jsonl`` writer and the benchmarks' timeline reading it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from benchmarks.simlog import read_round_timeline, site_events_files
from fedbrats.federated.client.train_script import site_events_writer
from fedbrats.federated.events import RoundEventWriter
from fedbrats.runs import SITE_EVENTS_FILE
from fedbrats.simulate import simulated_site_run_dir


def test_site_work_events_are_written_and_read_back_as_site_spans(tmp_path: Path) -> None:
    """Each site's file under the simulator's layout gives its span and steps in the round the server started."""
    server = tmp_path / "round_events.jsonl"
    clock = iter([10.0, 20.0])
    writer = RoundEventWriter(str(server), clock=lambda: next(clock))
    writer.write("round_start", 0)
    writer.write("round_end", 0, seconds=10.0)
    for site, started in (("site-1", 11.0), ("site-2", 12.0)):
        run_dir = Path(simulated_site_run_dir(str(tmp_path), site))
        run_dir.mkdir(parents=True)
        events = RoundEventWriter(str(run_dir / SITE_EVENTS_FILE), clock=lambda started=started: started + 4.0)
        events.write("site_work", 0, site=site, started=started, seconds=4.0, steps=7)
        # A round the server never started (e.g. a stale line) is no training round of the run.
        events.write("site_work", 5, site=site, started=started, seconds=4.0, steps=7)
    files = site_events_files(str(tmp_path), ["site-1", "site-2", "site-3"])  # site-3 wrote nothing
    assert files[0] == str(tmp_path / "sim" / "site-1" / "simulate_job" / SITE_EVENTS_FILE)
    tl = read_round_timeline(str(server), files)
    assert sorted(tl.rounds) == [0]
    assert tl.rounds[0].sites == {"site-1": (11.0, 15.0), "site-2": (12.0, 16.0)}
    assert tl.rounds[0].site_steps == {"site-1": 7, "site-2": 7}
    b = tl.rounds[0].breakdown()
    assert b["dispatch"] == pytest.approx(1.0) and b["site_work_max"] == pytest.approx(4.0)
    assert b["aggregate"] == pytest.approx(4.0)


def test_site_events_writer_appends_to_the_run_folder(tmp_path: Path) -> None:
    before = time.time()
    events = site_events_writer(str(tmp_path))
    events.write("site_work", 0, site="site-1", started=before, seconds=0.5, steps=3)
    events.write("site_work", 1, site="site-1", started=before, seconds=0.25, steps=3)
    lines = [json.loads(line) for line in (tmp_path / SITE_EVENTS_FILE).read_text().splitlines()]
    assert [(e["event"], e["round"], e["site"], e["seconds"], e["steps"]) for e in lines] == [
        ("site_work", 0, "site-1", 0.5, 3),
        ("site_work", 1, "site-1", 0.25, 3),
    ]
    assert all(before <= e["started"] <= e["time"] <= time.time() for e in lines)


def test_site_events_writer_never_stops_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An unwritable run folder warns once and every write goes on; no run folder means no events."""
    assert site_events_writer(None) is None and site_events_writer("") is None
    events = site_events_writer(str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger="fedbrats.federated.events"):
        for r in range(3):
            record = events.write("site_work", r, site="site-1", started=1.0, seconds=2.0, steps=3)
            assert record["round"] == r
    assert len([m for m in caplog.messages if "cannot write events" in m]) == 1
    assert not (tmp_path / "missing").exists()
    # The controller's writer (not best effort) still fails loudly.
    with pytest.raises(OSError):
        RoundEventWriter(str(tmp_path / "missing" / "round_events.jsonl")).write("run_start", None)
