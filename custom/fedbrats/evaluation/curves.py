"""``fedbrats plot-run RUN_DIR --out curves.png``: a run's curves, drawn from its ``metrics.json``.

One PNG with a panel per curve family, each stepped by the round as the tracked curves are
(:mod:`fedbrats.federated.tracking`, whose names the panels use): the global model's site-weighted validation
(mean Dice and Dice per region), each site's validation mean Dice, each site's training loss, and one panel per
loss term a method reported (``loss_drl``, ``loss_rcl``, ...). The final validation of the global model is the
step ``num_rounds``. Nothing is read from log lines or from the tracking store, so it works on a downloaded run
folder, with or without TensorBoard or MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from fedbrats.commands import run_command
from fedbrats.constants import REGIONS
from fedbrats.federated.protocol import KEY_METRIC, METRIC_PREFIX, TRAIN_LOSS_KEY
from fedbrats.federated.tracking import LOSS_TERM_PREFIX, global_scalars, site_scalars
from fedbrats.runs import RunFolder

logger = logging.getLogger(__name__)

#: Series of one panel: label -> (steps, values).
Series = dict[str, tuple[list[int], list[float]]]
#: The global model's curves in the first panel: the model-selection metric and the Dice of each region.
GLOBAL_TAGS: tuple[str, ...] = (KEY_METRIC, *(f"{METRIC_PREFIX}dice_{region}" for region in REGIONS))
PANEL_COLUMNS = 3


def load_history(run_dir: str) -> list[dict[str, Any]]:
    """The per-round records of a run folder's ``metrics.json``.

    Raises:
        FileNotFoundError: the folder has no ``metrics.json``.
        ValueError: the file is not a list of round records.
    """
    path = RunFolder(run_dir).metrics
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; pass the server's run folder (it holds metrics.json)")
    with open(path, encoding="utf-8") as f:
        history = json.load(f)
    if not isinstance(history, list) or not all(isinstance(r, dict) and "round" in r for r in history):
        raise ValueError(f"{path} is not a fedbrats metrics.json (a list of round records with 'round')")
    return history


def _add(series: Series, label: str, step: int, value: float) -> None:
    steps, values = series.setdefault(label, ([], []))
    steps.append(step)
    values.append(value)


def run_curves(history: Sequence[Mapping[str, Any]]) -> dict[str, Series]:
    """The panels of :func:`plot_run`: panel title -> its series, from the records of ``metrics.json``.

    Each series holds the rounds where its value is known (a site validates every ``val_every`` rounds; the final
    validation has no training loss).
    """
    panels: dict[str, Series] = {"global model (site-weighted validation)": {}}
    per_site: dict[str, Series] = {KEY_METRIC: {}, TRAIN_LOSS_KEY: {}}
    terms: dict[str, Series] = {}
    for record in history:
        step = int(record["round"])
        aggregate = global_scalars(record)
        for tag in GLOBAL_TAGS:
            if tag in aggregate:
                _add(panels["global model (site-weighted validation)"], tag, step, aggregate[tag])
        for site, entry in sorted((record.get("sites") or {}).items()):
            for tag, value in site_scalars(entry).items():
                if tag in per_site:
                    _add(per_site[tag], site, step, value)
                elif tag.startswith(LOSS_TERM_PREFIX):
                    _add(terms.setdefault(tag, {}), site, step, value)
    panels[f"{KEY_METRIC} per site"] = per_site[KEY_METRIC]
    panels[f"{TRAIN_LOSS_KEY} per site"] = per_site[TRAIN_LOSS_KEY]
    for tag in sorted(terms):
        panels[f"{tag} per site"] = terms[tag]
    return panels


def plot_run(run_dir: str, out: str, title: str | None = None) -> str:
    """Draw a run's curves (:func:`run_curves`) into the PNG ``out``; return its path.

    Args:
        run_dir: the server's run folder (or a copy holding its ``metrics.json``).
        out: the PNG to write (its folder is created).
        title: the figure's title (default: the run folder's path).

    Raises:
        FileNotFoundError: no ``metrics.json`` in ``run_dir``.
        ValueError: ``metrics.json`` holds no curve at all.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = {name: series for name, series in run_curves(load_history(run_dir)).items() if series}
    if not panels:
        raise ValueError(f"{RunFolder(run_dir).metrics} holds no metric or loss to plot")
    # One step axis for every panel: the run's rounds, the final validation included.
    last = max(step for series in panels.values() for steps, _ in series.values() for step in steps)
    rows = math.ceil(len(panels) / PANEL_COLUMNS)
    cols = min(len(panels), PANEL_COLUMNS)
    fig = Figure(figsize=(5.0 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    for index, (name, series) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(rows, cols, index)
        for label, (steps, values) in series.items():
            ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("round")
        ax.set_xlim(-0.25, last + 0.25)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole steps
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or os.path.abspath(run_dir), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title above the panels
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    logger.info("wrote %s (%d panels from %s)", out, len(panels), RunFolder(run_dir).metrics)
    return out


#: What ``fedbrats plot-run`` does (its ``--help``).
PLOT_RUN_DESCRIPTION = (
    "Plot a run's curves (global model validation, per-site validation, training loss and every loss term, by "
    "round) from its metrics.json to a PNG."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats plot-run`` options."""
    parser.add_argument("run_dir", help="the server's run folder (holds metrics.json)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--title", default=None, help="figure title (default: the run folder)")


def run(args: argparse.Namespace) -> int:
    """Run ``fedbrats plot-run`` with parsed options."""
    plot_run(args.run_dir, args.out or os.path.join(args.run_dir, "curves.png"), args.title)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fedbrats plot-run``: a run's curves to PNG; 0 on success."""
    return run_command("plot-run", add_arguments, run, argv, PLOT_RUN_DESCRIPTION)
