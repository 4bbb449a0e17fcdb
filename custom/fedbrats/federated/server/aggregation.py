"""Aggregation strategies: how the server turns the sites' updates into the next global model.

A strategy is an NVFlare component named in the job's server config; the controller looks it up by id, so
a sibling method brings its own strategy without touching the controller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nvflare.apis.fl_component import FLComponent

logger = logging.getLogger(__name__)


@dataclass
class SiteUpdate:
    """One site's accepted update of a round.

    Attributes:
        site_name: the NVFlare client name.
        params: weights by name (numpy arrays).
        meta: the declared extras (counts, availability, prototypes...).
        metrics: validation metrics of the global model it received.
        weight: aggregation weight (training steps of the round).
    """

    site_name: str
    params: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    weight: float = 1.0

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.meta.get("modalities", ()))


class AggregationStrategy(FLComponent):
    """Base class: combine accepted site updates into new global weights and extras for the next round.

    Attributes:
        name: strategy name for logs.
        keep_local_weights: tell sites to keep training their own weights (local-only baseline).
    """

    name = "base"
    keep_local_weights = False

    def aggregate(
        self, global_params: dict[str, np.ndarray], updates: list[SiteUpdate], current_round: int
    ) -> dict[str, np.ndarray]:
        """Return the next global weights; ``updates`` is non-empty and already validated."""
        raise NotImplementedError

    def global_meta(self) -> dict[str, Any]:
        """Extras sent to every site with the global model (numpy arrays or lists, never tensors)."""
        return {}

    def state(self) -> dict[str, Any]:
        """Server state beyond the weights, saved every round next to the model (e.g. prototypes)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (resuming a job)."""


def weighted_average(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted mean of same-shaped arrays, computed in float64 and returned in the first array's dtype."""
    if not arrays:
        raise ValueError("weighted_average needs at least one array")
    if len(arrays) != len(weights):
        raise ValueError(f"got {len(arrays)} arrays but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for a, w in zip(arrays, weights):
        acc += np.asarray(a, dtype=np.float64) * (w / total)
    return acc.astype(arrays[0].dtype, copy=False)


class WeightedAverage(AggregationStrategy):
    """FedAvg: every weight averaged over the sites, weighted by their training steps this round.

    Args:
        weight_by_steps: weight by steps (True) or equally (False).
    """

    name = "fedavg"

    def __init__(self, weight_by_steps: bool = True) -> None:
        super().__init__()
        self.weight_by_steps = weight_by_steps

    def _weights(self, updates: list[SiteUpdate]) -> list[float]:
        return [max(u.weight, 1e-12) if self.weight_by_steps else 1.0 for u in updates]

    def aggregate(
        self, global_params: dict[str, np.ndarray], updates: list[SiteUpdate], current_round: int
    ) -> dict[str, np.ndarray]:
        weights = self._weights(updates)
        out = dict(global_params)
        for key in global_params:
            out[key] = weighted_average([u.params[key] for u in updates], weights)
        return out


class LocalOnly(AggregationStrategy):
    """No federation: each site keeps its own weights; the server only records each site's latest model.

    The global model stays the initial one; the per-site models are the result (see the controller's
    ``site_models/``).
    """

    name = "local_only"
    keep_local_weights = True

    def aggregate(
        self, global_params: dict[str, np.ndarray], updates: list[SiteUpdate], current_round: int
    ) -> dict[str, np.ndarray]:
        return dict(global_params)
