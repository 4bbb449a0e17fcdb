"""Aggregation strategies: how the server turns the sites' updates into the next global model.

A strategy is an NVFlare component named in the job's server config; the controller looks it up by id, so
a sibling method brings its own strategy without touching the controller: a method's own strategy lives in its
folder and is registered with :data:`STRATEGIES` by :mod:`fedbrats.federated.methods` (FedKD's
``ModalityAwareAggregation`` in :mod:`fedbrats.federated.methods.fedkd.strategy`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nvflare.apis.fl_component import FLComponent

from fedbrats._moved import moved_attribute
from fedbrats.federated.protocol import MODALITIES_KEY
from fedbrats.registry import Registry

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
        return tuple(self.meta.get(MODALITIES_KEY, ()))


class AggregationStrategy(FLComponent):
    """Base class: combine accepted site updates into new global weights and extras for the next round.

    Attributes:
        name: strategy name for logs.
        keep_local_weights: tell sites to keep training their own weights (local-only baseline).
    """

    name = "base"
    keep_local_weights = False
    #: Meta items (beyond the base ones) a site's update may carry for this strategy; anything else is rejected.
    accepted_meta_keys: frozenset[str] = frozenset()

    def aggregate(
        self, global_params: dict[str, np.ndarray], updates: list[SiteUpdate], current_round: int
    ) -> dict[str, np.ndarray]:
        """Return the next global weights; ``updates`` is non-empty and already validated."""
        raise NotImplementedError

    def may_omit(self, name: str, modalities: tuple[str, ...]) -> bool:
        """Whether a site with ``modalities`` may leave weight ``name`` out of its update (default: never).

        A strategy that allows it must aggregate such a weight over the sites that sent it only.
        """
        return False

    def global_meta(self) -> dict[str, Any]:
        """Extras sent to every site with the global model (numpy arrays or lists, never tensors)."""
        return {}

    def task_groups(self, targets: list[str]) -> list[tuple[list[str], dict[str, Any]]]:
        """The targets of a training task in groups, each with extras for its sites only (beyond
        :meth:`global_meta`); default one group without extras. Every target must be in exactly one group."""
        return [(list(targets), {})]

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


#: The aggregation strategies this package builds itself from a job definition (the benchmarks do; NVFlare builds
#: the server's component from the job config): registered classes only, see :mod:`fedbrats.registry`.
STRATEGIES: Registry[AggregationStrategy] = Registry(
    "aggregation strategy",
    AggregationStrategy,
    {
        "weighted_average": f"{__name__}.WeightedAverage",
        "local_only": f"{__name__}.LocalOnly",
    },
)


# Classes that moved to a method folder stay reachable under their old path (fedbrats._moved).
__getattr__ = moved_attribute(__name__)
