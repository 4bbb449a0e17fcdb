"""Round timelines read from the simulator's log: where the wall time of a federated round goes.

The simulator writes the server's and every client's log lines, time-stamped, into one file. The controller
logs ``round R/N: sending the global model``, ``round R: <site> (...) loss ...`` once every result is in and
``round R done in Ss``; each site logs ``round R | site S | sent update: ..., X.Xs`` after validating the
global model and training (``X.X`` seconds of its own work). From these a round splits into:

- dispatch: from the server sending the task to the first site starting its work (task polling, transfer,
  deserialisation);
- site work: the longest site's validation + training + extras;
- return: from the last site's ``sent update`` to the server having every result (upload, result filters,
  the controller noticing it);
- aggregate: from every result being in to the round's end (checks, aggregation, saving, best-model selection).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - \w+ - (.*)$")
_SEND = re.compile(r"^round (\d+)/\d+: sending the global model")
_DONE = re.compile(r"^round (\d+) done in ([\d.]+)s")
_ACCEPT = re.compile(r"^round (\d+): (\S+) \(")
_SITE_SENT = re.compile(r"^round (\d+) \| site (\S+) \| sent update: (\d+) steps, loss \S+, ([\d.]+)s")
_START = re.compile(r"^start: (\d+) rounds")
_FINAL = re.compile(r"^final validation of the global model")
_FINISHED = re.compile(r"^finished (\d+) rounds")


def _timestamp(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class RoundTimeline:
    """Time stamps (``time.time()`` scale) of one training round.

    Attributes:
        round: round index.
        sent: the server sent the task.
        done: the round ended (after aggregation and saving).
        collected: the first accepted-result line (every result is in).
        sites: site -> ``(start, end)`` of its own work (validation + training + extras).
        site_steps: site -> optimisation steps.
    """

    round: int
    sent: float | None = None
    done: float | None = None
    collected: float | None = None
    sites: dict[str, tuple[float, float]] = field(default_factory=dict)
    site_steps: dict[str, int] = field(default_factory=dict)

    def breakdown(self) -> dict[str, float] | None:
        """Seconds of dispatch, site work, return and aggregation (see the module docstring); None if incomplete."""
        if self.sent is None or self.done is None or not self.sites:
            return None
        first_start = min(s for s, _ in self.sites.values())
        last_end = max(e for _, e in self.sites.values())
        collected = self.collected if self.collected is not None else last_end
        return {
            "wall": self.done - self.sent,
            "dispatch": max(first_start - self.sent, 0.0),
            "site_work_max": max(e - s for s, e in self.sites.values()),
            "site_work_mean": sum(e - s for s, e in self.sites.values()) / len(self.sites),
            "sites_span": last_end - first_start,
            "return": max(collected - last_end, 0.0),
            "aggregate": max(self.done - collected, 0.0),
        }


@dataclass
class SimulatorTimeline:
    """Everything :func:`parse_simulator_log` finds.

    Attributes:
        first_line: time of the log's first line.
        last_line: time of its last line.
        workflow_start: the controller's ``start:`` line.
        final_validation: the final-validation task was sent.
        finished: the controller's ``finished`` line.
        rounds: round index -> timeline.
    """

    first_line: float | None = None
    last_line: float | None = None
    workflow_start: float | None = None
    final_validation: float | None = None
    finished: float | None = None
    rounds: dict[int, RoundTimeline] = field(default_factory=dict)

    def round(self, index: int) -> RoundTimeline:
        return self.rounds.setdefault(index, RoundTimeline(index))

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_line": self.first_line,
            "last_line": self.last_line,
            "workflow_start": self.workflow_start,
            "final_validation": self.final_validation,
            "finished": self.finished,
            "rounds": {
                r: {"sent": t.sent, "done": t.done, "breakdown": t.breakdown(), "site_steps": t.site_steps}
                for r, t in sorted(self.rounds.items())
            },
        }


def parse_simulator_log(path: str) -> SimulatorTimeline:
    """Read a simulator log (``simulator.log`` of :func:`fedbrats.federated.simulate.simulate`)."""
    tl = SimulatorTimeline()
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            m = _LINE.match(raw.rstrip("\n"))
            if not m:
                continue
            t, msg = _timestamp(m.group(1)), m.group(2)
            tl.first_line = tl.first_line if tl.first_line is not None else t
            tl.last_line = t
            if mm := _SEND.match(msg):
                tl.round(int(mm.group(1))).sent = t
            elif mm := _DONE.match(msg):
                tl.round(int(mm.group(1))).done = t
            elif mm := _SITE_SENT.match(msg):
                rt = tl.round(int(mm.group(1)))
                rt.sites[mm.group(2)] = (t - float(mm.group(4)), t)
                rt.site_steps[mm.group(2)] = int(mm.group(3))
            elif mm := _ACCEPT.match(msg):
                rt = tl.round(int(mm.group(1)))
                rt.collected = rt.collected if rt.collected is not None else t
            elif _START.match(msg):
                tl.workflow_start = t
            elif _FINAL.match(msg):
                tl.final_validation = t
            elif _FINISHED.match(msg):
                tl.finished = t
    # Rounds without a send line are not training rounds of this run (e.g. the final validation's numbering).
    tl.rounds = {r: rt for r, rt in tl.rounds.items() if rt.sent is not None}
    return tl
