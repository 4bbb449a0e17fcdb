"""Round timelines of a simulated run: where the wall time of a federated round goes.

The server's side comes from the controller's progress events (``round_events.jsonl`` of the run folder, see
:mod:`fedbrats.federated.events`): ``round_start`` when the round sends the global model, ``results_collected``
once every result is in and ``round_end`` after aggregation and saving. A site's own work is known only at the
site: its training script writes a ``site_work`` event per round into ``site_events.jsonl`` of the site's run
folder once it has sent its update, with when its work (validating the global model, training, sending) started
and ended. From these a round splits into:

- dispatch: from the server sending the task to the first site starting its work (task polling, transfer,
  deserialisation);
- site work: the longest site's validation + training + extras;
- return: from the last site's update sent to the server having every result (upload, result filters,
  the controller noticing it);
- aggregate: from every result being in to the round's end (checks, aggregation, saving, best-model selection).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from fedbrats.federated.events import (
    FINAL_VALIDATION,
    RESULTS_COLLECTED,
    ROUND_END,
    ROUND_START,
    RUN_END,
    RUN_START,
    SITE_WORK,
)
from fedbrats.federated.events import read_events as _read_events
from fedbrats.runs import SITE_EVENTS_FILE


def site_events_files(workspace: str, sites: Iterable[str]) -> list[str]:
    """The sites' ``site_events.jsonl`` of a job :func:`fedbrats.simulate.simulate` ran in ``workspace``
    (a site that wrote none simply adds no spans)."""
    from fedbrats.simulate import simulated_site_run_dir

    return [os.path.join(simulated_site_run_dir(workspace, site), SITE_EVENTS_FILE) for site in sites]


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


def read_round_timeline(events_file: str, site_events: Iterable[str] = ()) -> SimulatorTimeline:
    """The round timelines of a simulated run.

    Args:
        events_file: the server's ``round_events.jsonl`` (:attr:`fedbrats.federated.protocol.RunFolder.round_events`).
        site_events: the sites' ``site_events.jsonl`` (see :func:`site_events_files`), for the sites' own work;
            without them the rounds have no site spans and no breakdown.
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
    for path in site_events:
        for event in _read_events(path):
            if event["event"] == SITE_WORK:
                rt = tl.round(int(event["round"]))
                rt.sites[event["site"]] = (float(event["started"]), float(event["time"]))
                rt.site_steps[event["site"]] = int(event["steps"])
    # Rounds the server never started are not training rounds of this run (e.g. the final validation's numbering).
    tl.rounds = {r: rt for r, rt in tl.rounds.items() if rt.sent is not None}
    return tl


def overhead_summary(timeline: SimulatorTimeline) -> dict[str, float] | None:
    """Medians over a run's complete rounds: wall time, the sites' span (first site start to last site end),
    NVFlare's own share (dispatch + return + aggregation) and the ratio wall / span. The span is the sites' work
    as it ran inside the simulator, so the ratio leaves out any slowdown of the work itself; None without a
    complete round."""
    rows = [b for rt in timeline.rounds.values() if (b := rt.breakdown()) is not None and b["sites_span"] > 0]
    if not rows:
        return None

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    return {
        "rounds": len(rows),
        "wall_s": median([b["wall"] for b in rows]),
        "sites_span_s": median([b["sites_span"] for b in rows]),
        "nvflare_s": median([b["dispatch"] + b["return"] + b["aggregate"] for b in rows]),
        "ratio": median([b["wall"] / b["sites_span"] for b in rows]),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.simlog WORKSPACE...``: the round overhead of finished simulated runs, as JSON (one
    object per workspace of :func:`fedbrats.simulate.simulate`)."""
    import argparse
    import json
    import sys

    from fedbrats.runs import RunFolder
    from fedbrats.simulate import simulated_run_dir, simulator_workspace

    p = argparse.ArgumentParser(prog="python -m benchmarks.simlog", description=main.__doc__)
    p.add_argument("workspaces", nargs="+")
    args = p.parse_args(argv)
    out = {}
    for ws in args.workspaces:
        sim = simulator_workspace(ws)
        sites = sorted(d for d in os.listdir(sim) if d not in ("server", "startup") and os.path.isdir(f"{sim}/{d}"))
        timeline = read_round_timeline(RunFolder(simulated_run_dir(ws)).round_events, site_events_files(ws, sites))
        out[ws] = overhead_summary(timeline)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
