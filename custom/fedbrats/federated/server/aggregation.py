"""Aggregation strategies: how the server turns the sites' updates into the next global model.

A strategy is an NVFlare component named in the job's server config; the controller looks it up by id, so
a sibling method brings its own strategy without touching the controller: a method's own strategy lives in its
folder and is registered with :data:`STRATEGIES` by :mod:`fedbrats.federated.methods` (FedKD's
``ModalityAwareAggregation`` in :mod:`fedbrats.federated.methods.fedkd.strategy`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nvflare.apis.fl_component import FLComponent

from fedbrats._moved import moved_attribute
from fedbrats.federated.protocol import MODALITIES_KEY
from fedbrats.federated.server.update_checks import UpdateBounds, declared_extras_problem
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

    def extras_problem(self, meta: Mapping[str, Any], bounds: UpdateBounds) -> str | None:
        """Why the extras of a site's update (its items beyond the base ones) are unacceptable, or None.

        Called before anything is aggregated, with the base items already checked (``bounds``: what an honest site
        can report this round). The default accepts :attr:`accepted_meta_keys` holding finite numeric arrays; a
        strategy whose extras have a shape or a range checks them here, so that nothing a site sends can raise
        inside :meth:`aggregate`.
        """
        return declared_extras_problem(meta, self.accepted_meta_keys)

    def may_omit(self, name: str, modalities: tuple[str, ...]) -> bool:
        """Whether a site with ``modalities`` may leave weight ``name`` out of its update (default: never).

        A strategy that allows it must aggregate such a weight over the sites that sent it only.
        """
        return False

    def global_meta(self) -> dict[str, Any]:
        """Extras sent to every site with the global model (numpy arrays or lists, never tensors)."""
        return {}

    def begin_round(self, current_round: int) -> None:
        """Called by the controller before it sends round ``current_round``'s training task (a round without any
        usable update is begun too, but never aggregated); nothing by default."""

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


#: How a strategy combines the sites' values of one weight: the weighted mean (FedAvg), or a rule that one site
#: cannot drag alone: the coordinate-wise median, or the coordinate-wise mean after dropping the ``trim_fraction``
#: largest and smallest values (both unweighted: a site's weight is what it reports of itself).
COMBINE_RULES: tuple[str, ...] = ("mean", "median", "trimmed_mean")


def combine(
    arrays: list[np.ndarray], weights: list[float], rule: str = "mean", trim_fraction: float = 0.2
) -> np.ndarray:
    """The sites' values of one weight combined by ``rule`` (:data:`COMBINE_RULES`), in the first array's dtype.

    Raises:
        ValueError: an unknown rule, no arrays, or weights that do not fit them.
    """
    if rule == "mean":
        return weighted_average(arrays, weights)
    if rule not in COMBINE_RULES:
        raise ValueError(f"rule must be one of {COMBINE_RULES}, got {rule!r}")
    if not arrays:
        raise ValueError("combine needs at least one array")
    stack = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
    if rule == "median":
        return np.median(stack, axis=0).astype(arrays[0].dtype, copy=False)
    cut = int(np.floor(trim_fraction * len(arrays)))
    kept = np.sort(stack, axis=0)[cut : len(arrays) - cut]
    return kept.mean(axis=0).astype(arrays[0].dtype, copy=False)


def clip_updates(global_params: Mapping[str, np.ndarray], updates: list[SiteUpdate], factor: float) -> list[SiteUpdate]:
    """Each site's update (its weights minus the global ones) scaled down to at most ``factor`` times the median
    update norm of the round, so that one site cannot move the model further than the others do.

    Returns:
        New site updates (the given ones when ``factor`` is 0 or fewer than two sites sent one).
    """
    if factor <= 0 or len(updates) < 2:
        return updates

    def norm(u: SiteUpdate) -> float:
        return math.sqrt(sum(float(np.sum((u.params[k] - global_params[k]) ** 2)) for k in u.params))

    norms = [norm(u) for u in updates]
    limit = factor * float(np.median(norms))
    out = []
    for u, n in zip(updates, norms):
        scale = 1.0 if n <= limit or n == 0 else limit / n
        if scale < 1.0:
            logger.warning("%s: update norm %.3g clipped to %.3g (%.1f x the median)", u.site_name, n, limit, factor)
        params = {k: (global_params[k] + scale * (v - global_params[k])).astype(v.dtype) for k, v in u.params.items()}
        out.append(dataclasses.replace(u, params=params) if scale < 1.0 else u)
    return out


class WeightedAverage(AggregationStrategy):
    """FedAvg: every weight averaged over the sites, weighted by their training steps this round; optionally
    robust to a site that sends a harmful update (``rule``, ``clip_factor``).

    Args:
        weight_by_steps: weight by steps (True) or equally (False).
        rule: how the sites' values of a weight are combined, one of :data:`COMBINE_RULES` (``mean``: FedAvg).
        trim_fraction: with ``trimmed_mean``, the share of largest and of smallest values dropped per coordinate.
        clip_factor: before combining, scale each site's update down to at most this many times the round's
            median update norm (0: no clipping; see :func:`clip_updates`).

    Raises:
        ValueError: an unknown rule, a trim fraction outside [0, 0.5), a negative clip factor.
    """

    name = "fedavg"

    def __init__(
        self, weight_by_steps: bool = True, rule: str = "mean", trim_fraction: float = 0.2, clip_factor: float = 0.0
    ) -> None:
        super().__init__()
        if rule not in COMBINE_RULES:
            raise ValueError(f"rule must be one of {COMBINE_RULES}, got {rule!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        if not clip_factor >= 0:
            raise ValueError(f"clip_factor must be >= 0 (0: off), got {clip_factor}")
        self.weight_by_steps = weight_by_steps
        self.rule = rule
        self.trim_fraction = trim_fraction
        self.clip_factor = clip_factor

    def _weights(self, updates: list[SiteUpdate]) -> list[float]:
        return [max(u.weight, 1e-12) if self.weight_by_steps else 1.0 for u in updates]

    def _combine(self, arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
        return combine(arrays, weights, self.rule, self.trim_fraction)

    def aggregate(
        self, global_params: dict[str, np.ndarray], updates: list[SiteUpdate], current_round: int
    ) -> dict[str, np.ndarray]:
        updates = clip_updates(global_params, updates, self.clip_factor)
        weights = self._weights(updates)
        out = dict(global_params)
        for key in global_params:
            out[key] = self._combine([u.params[key] for u in updates], weights)
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
