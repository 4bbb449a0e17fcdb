"""FedKD's server side: the distillation-aware, modality-aware aggregation and the global region prototypes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbrats.federated.methods.fedkd.network import parameter_modality
from fedbrats.federated.methods.fedkd.rcl import RCL_REGIONS
from fedbrats.federated.protocol import (
    GLOBAL_PROTOTYPE_VALID_KEY,
    GLOBAL_PROTOTYPES_KEY,
    NUM_STEPS_KEY,
    NUM_TRAIN_CASES_KEY,
)
from fedbrats.federated.server.aggregation import SiteUpdate, WeightedAverage, clip_updates
from fedbrats.federated.server.update_checks import UpdateBounds

logger = logging.getLogger(__name__)

#: What a FedKD site sends beyond the base items: its region prototypes, their voxel counts and case counts.
PROTOTYPE_KEYS: tuple[str, ...] = ("prototypes", "prototype_counts", "prototype_cases")
#: Widest region embedding accepted (the modality-aware network's content width is far below it).
MAX_PROTOTYPE_WIDTH = 4096


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
        rule, trim_fraction, clip_factor: how each weight's values are combined, robustly if asked (see
            :class:`~fedbrats.federated.server.aggregation.WeightedAverage`).
    """

    name = "fedkd"
    accepted_meta_keys = frozenset(PROTOTYPE_KEYS)

    def __init__(
        self,
        modality_aware: bool = True,
        weight_by_steps: bool = True,
        completeness_power: float = 1.0,
        prototype_momentum: float = 0.0,
        rule: str = "mean",
        trim_fraction: float = 0.2,
        clip_factor: float = 0.0,
    ) -> None:
        super().__init__(weight_by_steps, rule, trim_fraction, clip_factor)
        if not 0.0 <= prototype_momentum < 1.0:
            raise ValueError(f"prototype_momentum must be in [0, 1), got {prototype_momentum}")
        self.modality_aware = modality_aware
        self.completeness_power = completeness_power
        self.prototype_momentum = prototype_momentum
        self.prototypes: np.ndarray | None = None
        self.prototype_valid: np.ndarray | None = None

    def extras_problem(self, meta: Mapping[str, Any], bounds: UpdateBounds) -> str | None:
        """The prototypes come with their counts, one row per region, finite; voxel counts within what the site's
        steps can have seen, case counts within its declared cases; the embedding width that of the global
        prototypes once there are any."""
        problem = super().extras_problem(meta, bounds)
        present = [key for key in PROTOTYPE_KEYS if key in meta]
        if problem or not present:
            return problem
        if len(present) != len(PROTOTYPE_KEYS):
            return f"prototypes come with {list(PROTOTYPE_KEYS)}; the update holds only {present}"
        protos, counts, cases = (np.asarray(meta[key]) for key in PROTOTYPE_KEYS)
        regions = len(RCL_REGIONS)
        if protos.ndim != 2 or protos.shape[0] != regions or not 1 <= protos.shape[1] <= MAX_PROTOTYPE_WIDTH:
            return f"prototypes must be ({regions}, C) with 1 <= C <= {MAX_PROTOTYPE_WIDTH}, got {protos.shape}"
        if self.prototypes is not None and protos.shape != self.prototypes.shape:
            return f"prototypes have shape {protos.shape}, the global ones {self.prototypes.shape}"
        if counts.shape != (regions,) or cases.shape != (regions,):
            return f"prototype_counts and prototype_cases must be ({regions},), got {counts.shape} and {cases.shape}"
        most_voxels = bounds.max_voxels(int(meta[NUM_STEPS_KEY]))
        if (counts < 0).any() or (counts > most_voxels).any():
            return f"prototype_counts must be voxel counts in [0, {most_voxels}], got {counts.tolist()}"
        most_cases = int(meta[NUM_TRAIN_CASES_KEY])
        if (cases < 0).any() or (cases > most_cases).any() or not np.array_equal(cases, np.round(cases)):
            return f"prototype_cases must be case counts in [0, {most_cases}], got {cases.tolist()}"
        return None

    def may_omit(self, name: str, modalities: tuple[str, ...]) -> bool:
        """A site may leave out the encoders of sequences it lacks (they are averaged without it anyway)."""
        return self.modality_aware and parameter_modality(name) not in (None, *modalities)

    def aggregate(
        self, global_params: dict[str, np.ndarray], updates: list[SiteUpdate], current_round: int
    ) -> dict[str, np.ndarray]:
        updates = clip_updates(global_params, updates, self.clip_factor)
        weights = self._weights(updates)
        out = dict(global_params)
        for key in global_params:
            modality = parameter_modality(key) if self.modality_aware else None
            if modality is None:
                out[key] = self._combine([u.params[key] for u in updates], weights)
                continue
            having = [(u, w) for u, w in zip(updates, weights) if modality in u.modalities]
            if having:
                out[key] = self._combine([u.params[key] for u, _ in having], [w for _, w in having])
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


__all__ = ["ModalityAwareAggregation"]
