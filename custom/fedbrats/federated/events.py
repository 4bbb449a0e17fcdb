"""The controller's progress as JSON lines beside ``metrics.json`` (``round_events.jsonl`` of the run folder).

One line per event, each with the wall-clock ``time`` (``time.time()``), the ``event`` kind and the ``round``
(None before the first round). Tools follow this file (the benchmarks' round timelines, the deployment's job
follower, the simulator's failure message) instead of parsing the controller's log lines, which are for people
and may change wording at any time.

Events, in the order a run writes them:

- ``run_start``: ``num_rounds``, ``aggregation``, ``model`` (the network's class path), ``resumed_from``;
- per training round: ``round_start`` (``targets``), ``task_dispatched`` (``task``, ``targets``), one
  ``result_received`` per result (``task``, ``site``, ``usable``, ``reason`` when not usable),
  ``results_collected`` (``task``, ``usable``, ``rejected``, ``left_out``), ``aggregation_done`` (``sites``)
  when an update was usable, ``round_end`` (``seconds``, ``aggregated``: the site-weighted metrics);
- ``final_validation`` (``targets``), then its ``task_dispatched``, ``result_received`` and
  ``results_collected`` with ``task`` "validate";
- ``run_end`` when the workflow finished, or ``job_stop`` (``reason``) when the controller stopped the job
  (no usable update, a bad component, an abort) or ``job_error`` (``error``) when it failed.

A site writes its own events the same way into ``site_events.jsonl`` of its run folder (the training script,
best effort: a site that cannot write it still trains): one ``site_work`` per training round once its update is
sent (``site``, ``started``: the wall-clock start of its work, ``seconds`` of validation + training + extras +
sending, ``steps``: optimisation steps), its ``time`` being the end of that work.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedbrats.utils import FileTail

logger = logging.getLogger(__name__)

RUN_START = "run_start"
ROUND_START = "round_start"
TASK_DISPATCHED = "task_dispatched"
RESULT_RECEIVED = "result_received"
RESULTS_COLLECTED = "results_collected"
AGGREGATION_DONE = "aggregation_done"
ROUND_END = "round_end"
FINAL_VALIDATION = "final_validation"
RUN_END = "run_end"
JOB_STOP = "job_stop"
JOB_ERROR = "job_error"
#: A site's event (its own events file): its work of one training round.
SITE_WORK = "site_work"

#: Every event kind a run writes (the controller's and the sites').
EVENTS: frozenset[str] = frozenset(
    {
        RUN_START,
        ROUND_START,
        TASK_DISPATCHED,
        RESULT_RECEIVED,
        RESULTS_COLLECTED,
        AGGREGATION_DONE,
        ROUND_END,
        FINAL_VALIDATION,
        RUN_END,
        JOB_STOP,
        JOB_ERROR,
        SITE_WORK,
    }
)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return str(value)


class RoundEventWriter:
    """Appends events to a JSON-lines file, one complete line per write (safe from several threads).

    Each line is flushed at once so that a follower reading the growing file sees the event when it happens.

    Args:
        path: the events file (appended to; its folder must exist).
        clock: wall-clock time source (``time.time``; replaceable in tests).
        best_effort: a write that fails (an unwritable folder, a full disk) logs one warning, the first time, and
            is skipped instead of raising: for writers whose work must go on (a site's training).
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.time, best_effort: bool = False) -> None:
        if not path:
            raise ValueError(f"path must name the events file, got {path!r}")
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._best_effort = best_effort
        self._warned = False

    def write(self, event: str, current_round: int | None, **fields: Any) -> dict[str, Any]:
        """Append one event and return it.

        Args:
            event: one of :data:`EVENTS`.
            current_round: the round it belongs to (None before the first).
            **fields: the event's own items (JSON values; numpy values are converted).

        Raises:
            ValueError: an unknown event kind, or a field named like a common item.
        """
        if event not in EVENTS:
            raise ValueError(f"event must be one of {sorted(EVENTS)}, got {event!r}")
        clash = {"time", "event", "round"} & set(fields)
        if clash:
            raise ValueError(f"fields must not be named {sorted(clash)}: every event has them")
        record = {"time": self._clock(), "event": event, "round": current_round, **fields}
        line = json.dumps(record, default=_json_default) + "\n"
        with self._lock:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
            except OSError as exc:
                if not self._best_effort:
                    raise
                if not self._warned:
                    self._warned = True
                    logger.warning("cannot write events to %s (%s): going on without them", self.path, exc)
        return record


class EventFollower:
    """Reads an events file as it grows: each :meth:`poll` returns the events written since the last one.

    A line still being written (no newline yet) waits for the next poll; a line that is not valid JSON is
    skipped with a warning, so that one damaged line does not hide the rest.

    Args:
        path: the events file (it may not exist yet).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._tail = FileTail(path)

    def poll(self) -> list[dict[str, Any]]:
        """The events appended since the last call (empty while the file does not exist)."""
        events = []
        for line in self._tail.lines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s: skipping a line that is not JSON: %.200s", self.path, line)
                continue
            if isinstance(record, dict) and "event" in record:
                events.append(record)
        return events


def read_events(path: str) -> list[dict[str, Any]]:
    """Every complete event of an events file (empty when the file does not exist)."""
    return EventFollower(path).poll()


#: How :func:`describe` words each event; ``{name}`` is the event's item of that name (None when missing).
_DESCRIPTIONS = {
    RUN_START: "start: {num_rounds} rounds, aggregation {aggregation}",
    ROUND_START: "round {round}: sending the global model to {targets}",
    TASK_DISPATCHED: "round {round}: {task} task sent to {targets}",
    AGGREGATION_DONE: "round {round}: aggregated the updates of {sites}",
    ROUND_END: "round {round} done in {seconds}s",
    SITE_WORK: "round {round}: {site} worked {seconds}s, {steps} steps",
    FINAL_VALIDATION: "final validation of the global model on {targets}",
    RUN_END: "finished {num_rounds} rounds",
    JOB_STOP: "stopped the job: {reason}",
    JOB_ERROR: "the workflow failed: {error}",
}


def describe(event: dict[str, Any]) -> str:
    """One line for people about an event (what the deployment's follower logs)."""
    kind, r = event.get("event"), event.get("round")
    if kind == RESULT_RECEIVED:
        state = "usable" if event.get("usable") else f"rejected ({event.get('reason')})"
        return f"round {r}: {event.get('task')} result of {event.get('site')}: {state}"
    if kind == RESULTS_COLLECTED:
        line = f"round {r}: {len(event.get('usable') or [])} usable {event.get('task')} result(s)"
        if event.get("rejected"):
            line += f", rejected {sorted(event['rejected'])}"
        if event.get("left_out"):
            line += f", none from {event['left_out']}"
        return line
    template = _DESCRIPTIONS.get(str(kind), "round {round}: {event}")
    return template.format_map(collections.defaultdict(lambda: None, event))


def is_problem(event: dict[str, Any]) -> bool:
    """Whether an event reports something going wrong (a rejected or missing result, a stop, an error)."""
    kind = event.get("event")
    if kind == RESULT_RECEIVED:
        return not event.get("usable")
    if kind == RESULTS_COLLECTED:
        no_update = event.get("task") == "train" and not event.get("usable")
        return bool(event.get("left_out") or event.get("rejected") or no_update)
    return kind in (JOB_STOP, JOB_ERROR)
