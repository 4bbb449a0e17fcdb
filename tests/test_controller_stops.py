"""The server stops a job whose sites send no usable update (issue 13, item 16), instead of reporting success."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel

from fedbrats.federated.server.aggregation import WeightedAverage
from fedbrats.federated.server.controller import FedBratsController, _Checked

SITES = ["site-1", "site-2"]


def _controller(tmp_path: Path, schedule: list[bool], **kwargs: int) -> tuple[FedBratsController, list[str], list]:
    """A controller whose NVFlare surroundings are stand-ins; round r's sites succeed when ``schedule[r]``."""
    ctrl = FedBratsController(num_rounds=len(schedule), final_validation=False, **kwargs)
    panics: list[str] = []
    rounds: list[int] = []
    ctrl.get_component = lambda _id: WeightedAverage()  # type: ignore[method-assign]
    ctrl.load_model = lambda: FLModel(params={"w": np.zeros(2, dtype=np.float32)})  # type: ignore[method-assign]
    ctrl._model_spec = lambda: {"path": "net", "args": {}}  # type: ignore[method-assign]
    ctrl.get_run_dir = lambda: str(tmp_path)  # type: ignore[method-assign]
    ctrl.fl_ctx = FLContext()
    ctrl.abort_signal = None
    ctrl.event = lambda _e: None  # type: ignore[method-assign]
    ctrl.sample_clients = lambda num_clients=None: list(SITES)  # type: ignore[method-assign]
    ctrl.save_model = lambda _m: None  # type: ignore[method-assign]
    ctrl.panic = panics.append  # type: ignore[method-assign]

    def collect(task: str, data: FLModel, targets: list[str], global_params: dict) -> list[_Checked]:
        rounds.append(data.current_round)
        if schedule[data.current_round]:
            params = {"w": np.ones(2, dtype=np.float32)}
            return [_Checked(s, params, {"num_steps": 1}, {}, None) for s in targets]
        # site-1 says why; site-2 sends nothing at all
        return [_Checked("site-1", {}, {}, {}, "the site failed: ValueError: no entry for site 'site-1'")]

    ctrl._collect = collect  # type: ignore[method-assign]
    return ctrl, panics, rounds


def test_first_round_without_update_stops_at_once(tmp_path: Path) -> None:
    ctrl, panics, rounds = _controller(tmp_path, [False] * 10)
    ctrl.run()
    assert rounds == [0]
    assert len(panics) == 1
    assert "no entry for site 'site-1'" in panics[0] and "site-2: sent nothing" in panics[0]
    assert [r["round"] for r in json.loads((tmp_path / "metrics.json").read_text())] == [0]


def test_later_empty_rounds_stop_after_max_empty_rounds(tmp_path: Path) -> None:
    ctrl, panics, rounds = _controller(tmp_path, [True, False, True, False, False, False, True], max_empty_rounds=2)
    ctrl.run()
    assert rounds == [0, 1, 2, 3, 4], "one empty round is tolerated; the second in a row stops the job"
    assert len(panics) == 1 and "2 consecutive rounds (max_empty_rounds=2)" in panics[0]


def test_rounds_with_updates_never_stop(tmp_path: Path) -> None:
    ctrl, panics, rounds = _controller(tmp_path, [True, False, True, False, True])
    ctrl.run()
    assert rounds == [0, 1, 2, 3, 4] and panics == []


def test_max_empty_rounds_is_checked() -> None:
    with pytest.raises(ValueError, match="max_empty_rounds"):
        FedBratsController(max_empty_rounds=0)


@pytest.mark.integration
def test_readme_simulator_command_with_real_site_names_fails_visibly(
    real_named_federation: Path, tmp_path: Path
) -> None:
    """Issue 13's report: a sites.json with real site names and `nvflare simulator jobs/fedavg -n 2`.

    The sites are site-1/site-2, which the file lacks: the run must exit non-zero at round 0 with each reason.
    """
    sites = real_named_federation
    job = Path(__file__).resolve().parents[1] / "jobs" / "fedavg"
    env = dict(os.environ, FEDBRATS_SITE_CONFIG=str(sites))
    cmd = [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(tmp_path / "ws"), "-n", "2", "-t", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    stop = [line for line in output.splitlines() if "stopping the job" in line]
    assert stop, output[-3000:]
    assert "no entry for site 'site-1'" in stop[0] and "no entry for site 'site-2'" in stop[0]
    history = json.loads(next((tmp_path / "ws").rglob("metrics.json")).read_text())
    assert [r["round"] for r in history] == [0]


def test_simulate_error_repeats_why_the_job_stopped(tmp_path: Path) -> None:
    """`fedbrats simulate` prints the server's reason (each site's error) itself, not only "see simulator.log"."""
    from fedbrats.federated.events import RoundEventWriter
    from fedbrats.simulate import _failure_reason

    events = tmp_path / "round_events.jsonl"
    writer = RoundEventWriter(str(events))
    writer.write("result_received", 0, task="train", site="site-1", usable=False, reason="the site failed: ValueError")
    writer.write(
        "job_stop",
        0,
        reason="stopping the job: round 0, the first of this run, brought no usable update. Sites: site-1: the site "
        "failed: ValueError: bad datalist",
    )
    assert _failure_reason(str(events)).startswith(": stopping the job: round 0")
    events.unlink()
    writer.write("result_received", 0, task="validate", site="site-1", usable=False, reason="the site failed: OSError")
    writer.write(
        "result_received", 0, task="train", site="site-2", usable=False, reason="the site failed: KeyError: 'x'"
    )
    assert "site-2: the site failed: KeyError" in _failure_reason(str(events))
    assert _failure_reason(str(tmp_path / "missing.jsonl")) == ""


def _events(tmp_path: Path) -> list[dict]:
    from fedbrats.federated.events import read_events

    return read_events(str(tmp_path / "round_events.jsonl"))


def test_controller_writes_round_events(tmp_path: Path) -> None:
    """Every round's events in order, beside metrics.json, with the round's seconds as in metrics.json."""
    ctrl, panics, _ = _controller(tmp_path, [True, False])
    ctrl.run()
    assert panics == []
    events = _events(tmp_path)
    assert [(e["event"], e["round"]) for e in events] == [
        ("run_start", None),
        ("round_start", 0),
        ("results_collected", 0),
        ("aggregation_done", 0),
        ("round_end", 0),
        ("round_start", 1),
        ("results_collected", 1),
        ("round_end", 1),
        ("run_end", 1),
    ]
    times = [e["time"] for e in events]
    assert times == sorted(times)
    assert events[2]["usable"] == SITES and events[3]["sites"] == SITES
    assert events[6]["rejected"] == {"site-1": "the site failed: ValueError: no entry for site 'site-1'"}
    assert events[6]["left_out"] == ["site-2"] and events[6]["usable"] == []
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["seconds"] for e in events if e["event"] == "round_end"] == [r["seconds"] for r in history]


def test_controller_records_why_it_stopped(tmp_path: Path) -> None:
    ctrl, panics, _ = _controller(tmp_path, [False] * 3)
    ctrl.run()
    last = _events(tmp_path)[-1]
    assert last["event"] == "job_stop" and last["round"] == 0 and last["reason"] == panics[0]


def test_controller_records_an_error(tmp_path: Path) -> None:
    ctrl, _, _ = _controller(tmp_path, [True])

    def broken(*_args: object) -> None:
        raise OSError("disk full")

    ctrl._save_extras = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        ctrl.run()
    last = _events(tmp_path)[-1]
    assert last == {**last, "event": "job_error", "round": 0, "error": "OSError: disk full"}


def test_collect_records_each_result_as_it_arrives(tmp_path: Path) -> None:
    """The real _collect: the task is recorded before any result, then each result with usable or why not."""
    ctrl, _, _ = _controller(tmp_path, [True])
    del ctrl._collect  # the instance stand-in; back to the method
    ctrl.strategy = WeightedAverage()
    from fedbrats.federated.events import RoundEventWriter

    ctrl._events = RoundEventWriter(str(tmp_path / "round_events.jsonl"))
    ctrl._round = 4
    good = {"w": np.ones(2, dtype=np.float32)}

    def send_model(task_name: str, data: FLModel, targets: list[str], callback, **_kwargs: object) -> None:
        honest = {"site_name": "site-1", "num_steps": 2, "num_train_cases": 2, "modalities": ["t1"], "train_loss": 0.5}
        callback(FLModel(params=good, meta=honest))
        callback(FLModel(params={"w": np.full(2, np.nan, dtype=np.float32)}, meta={"site_name": "site-2"}))

    ctrl.send_model = send_model  # type: ignore[method-assign]
    ctrl.get_num_standing_tasks = lambda: 0  # type: ignore[method-assign]
    results = ctrl._collect("train", FLModel(params=good), SITES, {"w": np.zeros(2, dtype=np.float32)})
    assert len(results) == 2
    events = _events(tmp_path)
    assert [e["event"] for e in events] == ["task_dispatched", "result_received", "result_received"]
    assert events[0]["targets"] == SITES and {e["round"] for e in events} == {4}
    first, second = events[1], events[2]
    assert first["site"] == "site-1" and first["usable"] is True and first["reason"] is None
    assert second["site"] == "site-2" and second["usable"] is False and second["reason"]
