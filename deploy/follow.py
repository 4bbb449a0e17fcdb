"""Following a job on a server of this machine from the controller's round events and the server's log errors."""

from __future__ import annotations

import logging
import os
from typing import Any

from fedbrats.federated.events import (
    ROUND_END,
    ROUND_START,
    TASK_DISPATCHED,
    EventFollower,
    is_problem,
)
from fedbrats.federated.events import describe as describe_event
from fedbrats.runs import RunFolder
from fedbrats.utils import FileTail

logger = logging.getLogger(f"fedbrats.{__name__}")


class ServerProgressFollower:
    """Follows a job on a server of this machine: logs the workflow's progress and times its rounds.

    The progress and the round times come from the controller's round events (``round_events.jsonl`` of the job's
    run folder, see :mod:`fedbrats.federated.events`); the server's log is read only for errors of NVFlare's own
    components, which write no events.

    Args:
        run_dir: ``<server kit>/<job id>`` (the job's run folder, present while the job runs on this machine).
    """

    def __init__(self, run_dir: str) -> None:
        if not run_dir:
            raise ValueError(f"run_dir must name the job's run folder, got {run_dir!r}")
        self.run_dir = run_dir
        self._events = EventFollower(RunFolder(run_dir).round_events)
        self._log = FileTail(os.path.join(run_dir, "log.txt"))
        self._round_start: dict[int, float] = {}
        self.rounds: list[dict[str, float]] = []

    def poll(self) -> None:
        """Log what happened since the last poll and record the rounds that ended."""
        for event in self._events.poll():
            self._event(event)
        self._log_errors()

    def _event(self, event: dict[str, Any]) -> None:
        if event["event"] != TASK_DISPATCHED:  # round_start already said where the task goes
            logger.log(logging.WARNING if is_problem(event) else logging.INFO, "server: %s", describe_event(event))
        n, t = event.get("round"), float(event["time"])
        if event["event"] == ROUND_START:
            self._round_start[int(n)] = t
        elif event["event"] == ROUND_END and n in self._round_start:
            seconds = round(t - self._round_start[n], 2)
            self.rounds.append({"round": n, "seconds": seconds})
            logger.info("round %d took %.2fs", n, seconds)

    def _log_errors(self) -> None:
        """Repeat the server log's new ERROR lines of other components than the controller (it has events)."""
        for line in self._log.lines():
            # "<time> - <logger> - <LEVEL> - [<context>] - <message>" (the context is optional)
            parts = line.split(" - ", 3)
            if len(parts) < 4 or parts[2] != "ERROR" or parts[1].endswith("Controller"):
                continue
            message = parts[3].split("] - ", 1)[1] if parts[3].startswith("[") and "] - " in parts[3] else parts[3]
            logger.warning("server error (%s): %s", parts[1], message)
