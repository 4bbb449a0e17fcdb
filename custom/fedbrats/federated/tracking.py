"""Experiment tracking: what a run logs each round, on one step axis, and where it goes.

Every curve of a run is stepped by the federated **round** (the final validation of the global model is the step
``num_rounds``), so a site's losses, its validation of the global model and the server's aggregate line up:

- each site streams, per round, its mean training loss (``train_loss``), the mean of every loss term its method
  reports (``loss_<term>``: ``loss_drl``, ``loss_rcl``, ``loss_kd``, ...), its learning rate (``lr``) and its
  validation metrics of the global model it received (``val_mean_dice``, ``val_dice_wt``, ...), through NVFlare's
  tracking writer (``nvflare.client.tracking.SummaryWriter``) to the server;
- the server logs, per round, the site-weighted aggregate of those validation metrics (the global model's), under
  its own name, with the same tags.

The server's receiver decides where it all goes (:data:`TRACKERS`): TensorBoard event files in the run folder
(``tb_events/<site or server>/``, the default) or MLflow (:mod:`fedbrats.federated.server.mlflow_receiver`, the
optional ``mlflow`` extra). The same names are what ``fedbrats plot-run`` draws from ``metrics.json``
(:mod:`fedbrats.evaluation.curves`), so a curve has one name everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedbrats.federated.protocol import LOSS_TERMS_KEY, LR_KEY, TRAIN_LOSS_KEY

#: Where the server sends the curves: TensorBoard event files in the run folder, or an MLflow tracking store.
TRACKERS = ("tensorboard", "mlflow")
DEFAULT_TRACKING = "tensorboard"
#: Tag prefix of a loss term (``loss_drl``); the term's name is the method's (see its ``training_loss``).
LOSS_TERM_PREFIX = "loss_"
#: MLflow experiment every fedbrats job logs to (one run per site and one for the server, named after the job).
MLFLOW_EXPERIMENT = "fedbrats"


def check_tracking(tracking: str) -> str:
    """``tracking`` if it names a tracker of :data:`TRACKERS`.

    Raises:
        ValueError: any other value.
    """
    if tracking not in TRACKERS:
        raise ValueError(f"tracking must be one of {TRACKERS}, got {tracking!r}")
    return tracking


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite items (a NaN or inf would break a curve, and MLflow's stores refuse some)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def site_scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """A site's curves of one round from its round summary: a site's entry of a ``metrics.json`` record
    (``metrics``, ``train_loss``, ``loss_terms``), or the same built at the site (which adds ``lr``).

    Args:
        entry: ``{"metrics": {...}, "train_loss": x, "loss_terms": {...}, "lr": x}``; any part may be absent (a
            round without validation, the final validation without training).

    Returns:
        tag -> value, finite values only.
    """
    scalars = _finite(entry.get("metrics") or {})
    scalars.update(_finite({key: entry.get(key) for key in (TRAIN_LOSS_KEY, LR_KEY)}))
    terms = entry.get(LOSS_TERMS_KEY) or {}
    scalars.update(_finite({LOSS_TERM_PREFIX + name: value for name, value in terms.items()}))
    return scalars


def global_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The global model's curves of one round from its ``metrics.json`` record: the site-weighted aggregate of the
    sites' validation metrics (what the server logs under its own name)."""
    return _finite(record.get("aggregated") or {})
