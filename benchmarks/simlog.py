"""Round timelines of a simulated run: where the wall time of a federated round goes.

The server's side comes from the controller's progress events (``round_events.jsonl`` of the run folder, see
:mod:`fedbrats.federated.events`): ``round_start`` when the round sends the global model, ``results_collected``
once every result is in and ``round_end`` after aggregation and saving. A site's own work is known only at the
site: each logs ``round R | site S | sent update: N steps, loss L, X.Xs`` after validating the global model and
training (``X.X`` seconds of its own work), and the simulator writes those lines, time-stamped, into its log.
From these a round splits into:

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

from fedbrats.federated.events import FINAL_VALIDATION, RESULTS_COLLECTED, ROUND_END, ROUND_START, RUN_END, RUN_START
from fedbrats.federated.events import read_events as _read_events

# The sites' own lines (the server's progress comes from its events, not from its log).
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - \w+ - (.*)$")
_SITE_SENT = re.compile(r"^round (\d+) \| site (\S+) \| sent update: (\d+) steps, loss \S+, ([\d.]+)s")


def _timestamp(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class RoundTimeline:
    """Time stamps (``time.time()`` scale) of one training round.

    Attributes:
        round: round index.
        sent: the server sent the task (``round_start``).
        done: the round ended, after aggregation and saving (``round_end``).
        collected: every result is in (``results_collected``).
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
    """Everything :func:`read_round_timeline` finds.

    Attributes:
        workflow_start: the controller's ``run_start``.
        final_validation: the final-validation task was sent.
        finished: the controller's ``run_end``.
        rounds: round index -> timeline.
    """

    workflow_start: float | None = None
    final_validation: float | None = None
    finished: float | None = None
    rounds: dict[int, RoundTimeline] = field(default_factory=dict)

    def round(self, index: int) -> RoundTimeline:
        return self.rounds.setdefault(index, RoundTimeline(index))


def read_round_timeline(events_file: str, log_file: str | None = None) -> SimulatorTimeline:
    """The round timelines of a simulated run.

    Args:
        events_file: the server's ``round_events.jsonl`` (:attr:`fedbrats.federated.protocol.RunFolder.round_events`).
        log_file: the simulator's log (``simulator.log`` of :func:`fedbrats.federated.simulate.simulate`), for the
            sites' own work; without it the rounds have no site spans and no breakdown.
    """
    tl = SimulatorTimeline()
    for event in _read_events(events_file):
        kind, t, r = event["event"], float(event["time"]), event.get("round")
        if kind == RUN_START:
            tl.workflow_start = t
        elif kind == ROUND_START:
            tl.round(int(r)).sent = t
        elif kind == RESULTS_COLLECTED and event.get("task") == "train":
            rt = tl.round(int(r))
            rt.collected = rt.collected if rt.collected is not None else t
        elif kind == ROUND_END:
            tl.round(int(r)).done = t
        elif kind == FINAL_VALIDATION:
            tl.final_validation = t
        elif kind == RUN_END:
            tl.finished = t
    if log_file is not None:
        _read_site_work(log_file, tl)
    # Rounds the server never started are not training rounds of this run (e.g. the final validation's numbering).
    tl.rounds = {r: rt for r, rt in tl.rounds.items() if rt.sent is not None}
    return tl


def _read_site_work(log_file: str, tl: SimulatorTimeline) -> None:
    """Add each site's ``(start, end)`` of work and its steps per round, from the sites' lines of the log."""
    with open(log_file, encoding="utf-8", errors="replace") as f:
        for raw in f:
            m = _LINE.match(raw.rstrip("\n"))
            if not m:
                continue
            sent = _SITE_SENT.match(m.group(2))
            if sent:
                t = _timestamp(m.group(1))
                rt = tl.round(int(sent.group(1)))
                rt.sites[sent.group(2)] = (t - float(sent.group(4)), t)
                rt.site_steps[sent.group(2)] = int(sent.group(3))
