"""Checks everything a site sends must pass before it may enter the global model, before any arithmetic on it.

One site, buggy or hostile, must not take the federation down or steer it alone. So every item of a result is
checked for type, finiteness, shape and range before the server adds, weighs or stores anything from it: the base
items every update carries (:func:`base_items_problem`, with :class:`UpdateBounds`: the most steps and cases an
honest site can report in a round of this job), the weights (:func:`weights_problem`: the global model's names,
exact shapes, floating point, finite), the method's declared extras (the strategy's
:meth:`~fedbrats.federated.server.aggregation.AggregationStrategy.extras_problem`) and the validation metrics
(:func:`metrics_problem`). A violation rejects that update with the reason; the round goes on with the others.

What is not defended here: values that are well formed but false (a site may report a plausible Dice it did not
measure, or train on wrong labels); :mod:`fedbrats.federated.server.aggregation`'s robust strategies bound what such
a site can do to the weights (README, "Failure modes").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbrats.constants import MODALITIES
from fedbrats.federated.protocol import (
    LOSS_TERMS_KEY,
    LR_KEY,
    MODALITIES_KEY,
    NUM_STEPS_KEY,
    NUM_TRAIN_CASES_KEY,
    NVFLARE_NUM_STEPS_KEY,
    SITE_NAME_KEY,
    TRAIN_LOSS_KEY,
    is_finite_array,
    undeclared_meta_keys,
)

#: Longest site name, loss-term name or metric name accepted (they go into logs and metrics.json).
MAX_NAME_CHARS = 128
#: Most loss terms and metrics one result may report.
MAX_ITEMS = 256


@dataclass(frozen=True)
class UpdateBounds:
    """What an honest site can report in one training round of this job (from the job's training options).

    Attributes:
        epochs_per_round: local epochs a round.
        batch_size: training batch size.
        max_steps_per_epoch: the job's cap on batches an epoch (0: none).
        items_per_case: training items one case can give (1: a case is an item; a method that trains on slices
            declares its most slices a case).
        max_train_cases: most training cases a site may declare.
        voxels_per_item: most voxels one training item holds (the crop), which bounds voxel counts a site reports.
    """

    epochs_per_round: int = 10
    batch_size: int = 1
    max_steps_per_epoch: int = 0
    items_per_case: int = 1
    max_train_cases: int = 100_000
    voxels_per_item: int = 256**3

    def __post_init__(self) -> None:
        for name in ("epochs_per_round", "batch_size", "items_per_case", "max_train_cases", "voxels_per_item"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_steps_per_epoch, bool) or not isinstance(self.max_steps_per_epoch, int):
            raise ValueError(f"max_steps_per_epoch must be an integer >= 0, got {self.max_steps_per_epoch!r}")
        if self.max_steps_per_epoch < 0:
            raise ValueError(f"max_steps_per_epoch must be >= 0, got {self.max_steps_per_epoch}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> UpdateBounds:
        """Build from a job configuration's mapping, rejecting unknown keys by name."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown update bound(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)

    def max_steps(self, num_train_cases: int) -> int:
        """The most optimisation steps a round over ``num_train_cases`` cases can take."""
        per_epoch = math.ceil(num_train_cases * self.items_per_case / self.batch_size)
        if self.max_steps_per_epoch:
            per_epoch = min(per_epoch, self.max_steps_per_epoch)
        return self.epochs_per_round * per_epoch

    def max_voxels(self, num_steps: int) -> int:
        """The most training voxels ``num_steps`` steps can have seen."""
        return num_steps * self.batch_size * self.voxels_per_item


def is_real(value: Any) -> bool:
    """A finite real number (int or float, numpy's too; not a bool, not a string)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value))


def is_count(value: Any) -> bool:
    """A non-negative integer (a float with an integral value counts: JSON and NVFlare may turn one into the
    other)."""
    return is_real(value) and float(value) >= 0 and float(value).is_integer()


def _name_problem(value: Any, what: str) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        return f"{what} must be a name of 1 to {MAX_NAME_CHARS} characters, got {type(value).__name__}"
    return None


def base_items_problem(meta: Mapping[str, Any], bounds: UpdateBounds) -> str | None:
    """Why the base items of a training update (those every method sends) are unacceptable, or None.

    Required: the site's sequences (known names, each once), its training cases and steps (counts within
    ``bounds``), its mean training loss (finite). Optional: its name, learning rate (finite, >= 0), loss terms
    (names -> finite numbers) and NVFlare's own step count (equal to the steps).
    """
    if SITE_NAME_KEY in meta and (problem := _name_problem(meta[SITE_NAME_KEY], SITE_NAME_KEY)):
        return problem
    modalities = meta.get(MODALITIES_KEY)
    if (
        not isinstance(modalities, (list, tuple))
        or not modalities
        or not all(isinstance(m, str) and m in MODALITIES for m in modalities)
        or len(set(modalities)) != len(modalities)
    ):
        return f"{MODALITIES_KEY} must list the site's sequences, each once, of {list(MODALITIES)}; got {modalities!r}"
    cases = meta.get(NUM_TRAIN_CASES_KEY)
    if not is_count(cases) or int(cases) > bounds.max_train_cases:
        return f"{NUM_TRAIN_CASES_KEY} must be a count of at most {bounds.max_train_cases}, got {cases!r}"
    steps = meta.get(NUM_STEPS_KEY)
    most = bounds.max_steps(int(cases))
    if not is_count(steps) or int(steps) > most:
        return (
            f"{NUM_STEPS_KEY} must be a count of at most {most} ({bounds.epochs_per_round} epochs over {int(cases)} "
            f"declared case(s)), got {steps!r}"
        )
    if NVFLARE_NUM_STEPS_KEY in meta and (
        not is_count(meta[NVFLARE_NUM_STEPS_KEY]) or int(meta[NVFLARE_NUM_STEPS_KEY]) != int(steps)
    ):
        return f"{NVFLARE_NUM_STEPS_KEY} must equal {NUM_STEPS_KEY} ({int(steps)}), got {meta[NVFLARE_NUM_STEPS_KEY]!r}"
    if not is_real(meta.get(TRAIN_LOSS_KEY)):
        return f"{TRAIN_LOSS_KEY} must be a finite number, got {meta.get(TRAIN_LOSS_KEY)!r}"
    if LR_KEY in meta and (not is_real(meta[LR_KEY]) or float(meta[LR_KEY]) < 0):
        return f"{LR_KEY} must be a finite number >= 0, got {meta[LR_KEY]!r}"
    if LOSS_TERMS_KEY in meta:
        terms = meta[LOSS_TERMS_KEY]
        if not isinstance(terms, Mapping) or len(terms) > MAX_ITEMS:
            return f"{LOSS_TERMS_KEY} must map at most {MAX_ITEMS} term names to numbers, got {type(terms).__name__}"
        for name, value in terms.items():
            if (problem := _name_problem(name, f"a {LOSS_TERMS_KEY} name")) or not is_real(value):
                return problem or f"{LOSS_TERMS_KEY}[{name!r}] must be a finite number, got {value!r}"
    return None


def metrics_problem(metrics: Any) -> str | None:
    """Why a result's validation metrics are unacceptable, or None: names -> finite numbers, Dice in [0, 1] and
    distances (HD95) >= 0 (they select the best model and the post-processing, so they must at least be possible;
    a method's own metrics, such as IsoFed's information-maximisation score, need only be finite)."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping) or len(metrics) > MAX_ITEMS:
        return f"metrics must map at most {MAX_ITEMS} names to numbers, got {type(metrics).__name__}"
    for name, value in metrics.items():
        if (problem := _name_problem(name, "a metric name")) or not is_real(value):
            return problem or f"metric {name!r} must be a finite number, got {value!r}"
        if "dice" in name and not 0.0 <= float(value) <= 1.0:
            return f"metric {name!r} is a Dice, in [0, 1]; got {value!r}"
        if "hd95" in name and float(value) < 0:
            return f"metric {name!r} is a distance, >= 0; got {value!r}"
    return None


def weights_problem(
    global_params: Mapping[str, np.ndarray],
    params: Mapping[str, Any] | None,
    may_omit: Callable[[str], bool] | None = None,
) -> str | None:
    """Why a site's weights are unacceptable, or None: none at all, missing ones (other than those ``may_omit``
    allows this site to leave out), unexpected names, another shape than the global weight's, not floating point,
    NaN or Inf."""
    if not params:
        return "the update holds no weights"
    missing = sorted(k for k in set(global_params) - set(params) if may_omit is None or not may_omit(k))
    if missing:
        return f"{len(missing)} weight(s) missing, e.g. {missing[:3]}"
    extra = sorted(set(params) - set(global_params), key=str)
    if extra:
        return f"{len(extra)} unexpected weight(s), e.g. {extra[:3]}"
    for key, value in params.items():
        shape, expected = np.shape(value), np.shape(global_params[key])
        if shape != expected:
            return f"weight {key!r} has shape {shape}, expected {expected}"
        dtype = getattr(value, "dtype", None)
        if dtype is None or np.dtype(dtype).kind != "f":
            return f"weight {key!r} must hold floating-point numbers, got {dtype}"
        if not np.isfinite(value).all():
            return f"weight {key!r} holds NaN or Inf"
    return None


def declared_extras_problem(meta: Mapping[str, Any], declared: set[str] | frozenset[str]) -> str | None:
    """Items beyond the base ones the strategy did not declare, or a declared item that is not a finite numeric
    array (the default check of a strategy's extras)."""
    undeclared = undeclared_meta_keys(dict(meta), set(declared))
    if undeclared:
        return f"undeclared items in the update: {undeclared}"
    for key in declared:
        if key in meta and not is_finite_array(meta[key]):
            return f"item {key!r} is not a finite numeric array"
    return None


def update_problem(
    global_params: dict[str, np.ndarray],
    params: dict[str, Any] | None,
    meta: dict[str, Any],
    declared: set[str],
    may_omit: Callable[[str], bool] | None = None,
    bounds: UpdateBounds | None = None,
    extras_problem: Callable[[Mapping[str, Any], UpdateBounds], str | None] | None = None,
) -> str | None:
    """Why what a training update brings the strategy must be rejected, or None: its weights, then its extras
    (``extras_problem``, the strategy's; default :func:`declared_extras_problem` over ``declared``). The base items
    are :func:`base_items_problem`'s, checked first (the extras' bounds depend on them)."""
    bounds = bounds or UpdateBounds()
    return weights_problem(global_params, params, may_omit) or (
        extras_problem(meta, bounds) if extras_problem else declared_extras_problem(meta, declared)
    )


__all__ = [
    "UpdateBounds",
    "base_items_problem",
    "declared_extras_problem",
    "is_count",
    "is_real",
    "metrics_problem",
    "update_problem",
    "weights_problem",
]
