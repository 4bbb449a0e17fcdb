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

from fedbrats.federated.protocol import GLOBAL_PROTOTYPE_VALID_KEY, GLOBAL_PROTOTYPES_KEY, MODALITIES_KEY
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


class ModalityAwareAggregation(WeightedAverage):
    """FedKD's distillation-aware aggregation.

    - Each sequence's encoder (parameters named ``encoders.<i>.``) is averaged only over the sites that have that
      sequence (as FedMEMA / FedMEPD do); a sequence no site of the round has keeps its global weights. Sites may
      leave the encoders of sequences they lack out of their updates.
    - Shared parts (content head, decoder) are averaged over all sites, weighted by training steps.
    - Region prototypes: ``P_r = sum_s w_sr p_sr / sum_s w_sr`` with ``w_sr = n_sr * (|M_s| / 4) ** completeness_power``
      (``n_sr`` the site's voxel count of region r, ``|M_s|`` its number of sequences), so sites that see more of
      a region, with more complete inputs, shape the prototype more; then an optional momentum with the last
      round's prototypes. They go back to the sites as distillation and contrast targets.

    Args:
        modality_aware: average encoders over the sites having their sequence (False: plain FedAvg, an ablation).
        weight_by_steps: weight sites by training steps (True) or equally.
        completeness_power: exponent of the modality-completeness factor of the prototype weights (0: counts only).
        prototype_momentum: share of the previous global prototype kept each round (0: replaced).
    """

    name = "fedkd"
    accepted_meta_keys = frozenset({"prototypes", "prototype_counts", "prototype_cases"})

    def __init__(
        self,
        modality_aware: bool = True,
        weight_by_steps: bool = True,
        completeness_power: float = 1.0,
        prototype_momentum: float = 0.0,
    ) -> None:
        super().__init__(weight_by_steps)
        if not 0.0 <= prototype_momentum < 1.0:
            raise ValueError(f"prototype_momentum must be in [0, 1), got {prototype_momentum}")
        self.modality_aware = modality_aware
        self.completeness_power = completeness_power
        self.prototype_momentum = prototype_momentum
        self.prototypes: np.ndarray | None = None
        self.prototype_valid: np.ndarray | None = None

    def may_omit(self, name: str, modalities: tuple[str, ...]) -> bool:
        """A site may leave out the encoders of sequences it lacks (they are averaged without it anyway)."""
        from fedbrats.networks.modality_aware import parameter_modality

        return self.modality_aware and parameter_modality(name) not in (None, *modalities)

    def aggregate(
        self, global_params: dict[str, np.ndarray], updates: list[SiteUpdate], current_round: int
    ) -> dict[str, np.ndarray]:
        from fedbrats.networks.modality_aware import parameter_modality

        weights = self._weights(updates)
        out = dict(global_params)
        for key in global_params:
            modality = parameter_modality(key) if self.modality_aware else None
            if modality is None:
                out[key] = weighted_average([u.params[key] for u in updates], weights)
                continue
            having = [(u, w) for u, w in zip(updates, weights) if modality in u.modalities]
            if having:
                out[key] = weighted_average([u.params[key] for u, _ in having], [w for _, w in having])
        self._aggregate_prototypes(updates)
        return out

    def _aggregate_prototypes(self, updates: list[SiteUpdate]) -> None:
        sums, totals = None, None
        for u in updates:
            if "prototypes" not in u.meta:
                continue
            protos = np.asarray(u.meta["prototypes"], dtype=np.float64)
            counts = np.asarray(u.meta["prototype_counts"], dtype=np.float64)
            completeness = (len(u.modalities) / 4.0) ** self.completeness_power if u.modalities else 1.0
            w = counts * completeness
            if sums is None:
                sums, totals = np.zeros_like(protos), np.zeros_like(counts)
            sums += protos * w[:, None]
            totals += w
        if sums is None:
            return
        valid = totals > 0
        new = np.where(valid[:, None], sums / np.maximum(totals, 1e-12)[:, None], 0.0)
        if self.prototypes is not None and self.prototype_momentum > 0:
            both = valid & self.prototype_valid
            new[both] = self.prototype_momentum * self.prototypes[both] + (1 - self.prototype_momentum) * new[both]
            keep_old = ~valid & self.prototype_valid
            new[keep_old] = self.prototypes[keep_old]
            valid = valid | self.prototype_valid
        self.prototypes, self.prototype_valid = new.astype(np.float32), valid
        logger.info("global prototypes updated for regions %s", np.flatnonzero(valid).tolist())

    def global_meta(self) -> dict[str, Any]:
        if self.prototypes is None:
            return {}
        return {GLOBAL_PROTOTYPES_KEY: self.prototypes, GLOBAL_PROTOTYPE_VALID_KEY: self.prototype_valid}

    def state(self) -> dict[str, Any]:
        return self.global_meta()

    def load_state(self, state: dict[str, Any]) -> None:
        if GLOBAL_PROTOTYPES_KEY in state:
            self.prototypes = np.asarray(state[GLOBAL_PROTOTYPES_KEY], dtype=np.float32)
            self.prototype_valid = np.asarray(state[GLOBAL_PROTOTYPE_VALID_KEY], dtype=bool)


#: The aggregation strategies this package builds itself from a job definition (the benchmarks do; NVFlare builds
#: the server's component from the job config): registered classes only, see :mod:`fedbrats.registry`.
STRATEGIES: Registry[AggregationStrategy] = Registry(
    "aggregation strategy",
    AggregationStrategy,
    {
        "weighted_average": f"{__name__}.WeightedAverage",
        "local_only": f"{__name__}.LocalOnly",
        "modality_aware": f"{__name__}.ModalityAwareAggregation",
    },
    more_from="fedbrats.federated.methods",  # a method module may declare its own strategy
)
