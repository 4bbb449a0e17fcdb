"""The round protocol in one place: the keys of the messages between server and sites and what a site may send
(checked on both ends). The files a run leaves (run folder, model folder) are :mod:`fedbrats.runs`.

Every other module takes these names from here, so that a key is written once.

Nothing derived from a single patient's voxels leaves a site beyond these items: model weights, aggregate
validation metrics, counts, the site's sequence availability and, for methods that declare them, region
prototypes averaged over many voxels and cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbrats.constants import REGIONS, combination_name

# ---- server -> site (the meta of a task) -------------------------------------------------------------------
#: The network's ``{"path", "args"}`` spec: the architecture is defined once, on the server.
MODEL_SPEC_KEY = "model_spec"
#: Whether a site keeps its own weights instead of loading the global model (local-only training).
KEEP_LOCAL_WEIGHTS_KEY = "keep_local_weights"
#: FedKD's global region prototypes and which of them hold a value.
GLOBAL_PROTOTYPES_KEY = "global_prototypes"
GLOBAL_PROTOTYPE_VALID_KEY = "global_prototype_valid"
#: IsoFed's cross hand-off: weights (name -> array) a site starts its local training from instead of the global
#: model it scores (sent to labelled sites only: the unlabelled group's model).
HANDOFF_PARAMS_KEY = "handoff_params"

# ---- site -> server (the meta of a result) -----------------------------------------------------------------
SITE_NAME_KEY = "site_name"
#: The site's available sequences (names).
MODALITIES_KEY = "modalities"
#: Optimisation steps this round (the aggregation weight).
NUM_STEPS_KEY = "num_steps"
NUM_TRAIN_CASES_KEY = "num_train_cases"
#: Mean training loss of the round, and the mean of each loss term.
TRAIN_LOSS_KEY = "train_loss"
LOSS_TERMS_KEY = "loss_terms"
#: Learning rate at the end of the round (the schedule is the job's, not the data's).
LR_KEY = "lr"
#: NVFlare's own key for the number of steps.
NVFLARE_NUM_STEPS_KEY = "NUM_STEPS_CURRENT_ROUND"
#: Meta key of a site that cannot do its task: the one-line reason (its error message, cut to
#: :data:`SITE_ERROR_MAX_CHARS`), so that the server can name why a job stops. Sent instead of weights.
SITE_ERROR_KEY = "site_error"
SITE_ERROR_MAX_CHARS = 500
#: Meta key of an SVD-compressed payload, both ways (see :mod:`fedbrats.federated.compression`): the energy kept
#: and, from the server, which weights a site must hold to rebuild the global model. The receiving filter removes it.
SVD_META_KEY = "svd_compression"
#: Meta key a server-side filter sets on a result it found malformed before the controller saw it (a compressed
#: payload that does not decode): the controller rejects that result with this reason.
UPDATE_PROBLEM_KEY = "update_problem"
#: Whether the site trained with labels (a flag of the site's configuration, like its sequences), for methods
#: whose server keeps labelled and unlabelled sites apart (IsoFed).
LABELLED_KEY = "labelled"

#: Meta keys every method may send.
BASE_META_KEYS: frozenset[str] = frozenset(
    {
        SITE_NAME_KEY,
        SITE_ERROR_KEY,
        MODALITIES_KEY,
        NUM_STEPS_KEY,
        NUM_TRAIN_CASES_KEY,
        TRAIN_LOSS_KEY,
        LOSS_TERMS_KEY,
        LR_KEY,
        NVFLARE_NUM_STEPS_KEY,
        # Added by NVFlare's privacy filters on the way out: which filters ran and the privacy spent.
        "filter_history",
        "svt_privacy_budget",
        "svt_privacy_accountant",
        # Added by the SVD compression filter on the way out (and removed by its pair on the server).
        SVD_META_KEY,
        UPDATE_PROBLEM_KEY,
    }
)
#: The base items a site fills itself (:func:`site_update_meta`): a method's extras may not shadow them.
SITE_FILLED_KEYS: frozenset[str] = frozenset(
    {SITE_NAME_KEY, MODALITIES_KEY, NUM_STEPS_KEY, NUM_TRAIN_CASES_KEY, TRAIN_LOSS_KEY, LOSS_TERMS_KEY, LR_KEY}
)

#: Metric keys (aggregate over the site's validation cases) start with this.
METRIC_PREFIX = "val_"
#: The metric that selects the best global model (mean Dice over WT, TC and ET).
KEY_METRIC = f"{METRIC_PREFIX}mean_dice"

#: Server -> site: the name of the model a ``validate`` task of the cross-site evaluation carries (a global model's
#: file name or the site whose own model it is). A validate task without it is the training's final validation.
CROSS_SITE_MODEL_KEY = "cross_site_model"
#: The weights of such a task are named with this prefix: NVFlare's Client API reshapes received weights to the shapes
#: of the weights the site last sent under the same names, and another network (a site's personalised model) must
#: not be bent into the shapes of the site's own.
CROSS_SITE_PARAM_PREFIX = "cross_site_model/"


def cross_site_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The weights of a cross-site evaluation task, named apart from the site's own (see the prefix above)."""
    return {f"{CROSS_SITE_PARAM_PREFIX}{name}": value for name, value in params.items()}


def model_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The network's weights out of a cross-site evaluation task's (the inverse of :func:`cross_site_params`; names
    without the prefix, which the Client API may add, are left out)."""
    n = len(CROSS_SITE_PARAM_PREFIX)
    return {name[n:]: value for name, value in params.items() if name.startswith(CROSS_SITE_PARAM_PREFIX)}


# ---- site -> server: the cross-site evaluation of one model (aggregates over the site's labelled test cases) ----
#: Test metric keys start with this, so that they never mix with the validation metrics (:data:`METRIC_PREFIX`).
TEST_PREFIX = "test_"
#: How many test cases the site scored: 0 or absent means it has no labelled test cases (and sends no score).
TEST_NUM_CASES_KEY = f"{TEST_PREFIX}num_cases"
#: The metrics a site sends per region (``test_dice_WT``) and as the mean over the regions (``test_mean_dice``).
TEST_METRICS: tuple[str, ...] = ("dice", "hd95")
#: Infix of the means over the 15 sequence combinations, sent only by a site with all four sequences.
TEST_ALL15_INFIX = "all15_"
#: Infix of a single sequence combination's mean Dice (``test_combo_t1+flair_mean_dice``).
TEST_COMBO_INFIX = "combo_"


def cross_site_metric_key(metric: str, region: str | None = None, all15: bool = False) -> str:
    """The key of a cross-site test metric: ``test_dice_WT``, ``test_mean_hd95``, ``test_all15_dice_ET``, ...

    (Not named ``test_*``: pytest would collect it as a test wherever a test module imports it.)

    Args:
        metric: one of :data:`TEST_METRICS`.
        region: a region of :data:`~fedbrats.constants.REGIONS`, or ``None`` for the mean over the regions.
        all15: the mean over the 15 sequence combinations instead of the site's own sequences.

    Raises:
        ValueError: an unknown ``metric`` or ``region``.
    """
    if metric not in TEST_METRICS:
        raise ValueError(f"metric must be one of {TEST_METRICS}, got {metric!r}")
    if region is not None and region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS} or None, got {region!r}")
    name = f"mean_{metric}" if region is None else f"{metric}_{region}"
    return f"{TEST_PREFIX}{TEST_ALL15_INFIX if all15 else ''}{name}"


def cross_site_combination_key(modalities: str | tuple[str, ...] | list[str]) -> str:
    """The key of one sequence combination's mean Dice: ``test_combo_t1+t1ce+t2+flair_mean_dice``.

    Args:
        modalities: the combination as a name (``"flair+t1"``) or its sequences, in any order (the key uses the
            canonical order).

    Raises:
        ValueError: no known sequence in ``modalities``.
    """
    names = modalities.split("+") if isinstance(modalities, str) else list(modalities)
    name = combination_name(names)
    if not name:
        raise ValueError(f"modalities must name at least one sequence of t1, t1ce, t2, flair, got {modalities!r}")
    return f"{TEST_PREFIX}{TEST_COMBO_INFIX}{name}_mean_dice"


def global_task_meta(spec: Mapping[str, Any], keep_local_weights: bool, extras: Mapping[str, Any]) -> dict[str, Any]:
    """The meta the server sends with every task: the network spec, the keep-local flag and the strategy's extras.

    Args:
        spec: the network's ``{"path", "args"}`` spec.
        keep_local_weights: the aggregation strategy's flag (local-only training).
        extras: the strategy's global state for the sites (e.g. FedKD's prototypes).
    """
    return {MODEL_SPEC_KEY: spec, KEEP_LOCAL_WEIGHTS_KEY: keep_local_weights, **extras}


def site_update_meta(
    site_name: str, modalities: Any, num_train_cases: int, summary: Mapping[str, Any], extras: Mapping[str, Any]
) -> dict[str, Any]:
    """The meta of a site's training result (the items of :data:`BASE_META_KEYS` it fills, then the method's).

    Args:
        site_name: the site.
        modalities: the site's available sequences.
        num_train_cases: its training cases (the weight of its metrics on the server).
        summary: the round's summary from the trainer (steps, loss, loss terms, learning rate).
        extras: the method's declared payload, already converted by :func:`to_wire`.

    Raises:
        ValueError: the method's extras name a base item (they would overwrite what the site reports of itself).
    """
    shadowing = sorted(set(extras) & (BASE_META_KEYS | SITE_FILLED_KEYS))
    if shadowing:
        raise ValueError(
            f"the method's extras {shadowing} would overwrite the update's base items; a method sends its own items "
            "only (rename them and declare them in its payload_keys)"
        )
    return {
        SITE_NAME_KEY: site_name,
        MODALITIES_KEY: list(modalities),
        NUM_TRAIN_CASES_KEY: num_train_cases,
        **summary,
        **extras,
    }


def site_error_meta(site_name: str, exc: BaseException) -> dict[str, Any]:
    """The meta of a site that cannot do its task: its name and the failure's one-line reason."""
    return {SITE_NAME_KEY: site_name, SITE_ERROR_KEY: f"{type(exc).__name__}: {exc}"[:SITE_ERROR_MAX_CHARS]}


def update_weight(meta: Mapping[str, Any]) -> float:
    """A site update's aggregation weight: its optimisation steps (1 when it did not say)."""
    return float(meta.get(NUM_STEPS_KEY, 1) or 1)


def to_wire(value: Any) -> Any:
    """Convert tensors to numpy so they survive NVFlare's serialiser (torch tensors in meta break a job)."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


def undeclared_meta_keys(meta: dict[str, Any], declared: frozenset[str] | set[str]) -> list[str]:
    """Meta keys a site sent that are neither base keys nor declared by its method."""
    allowed = BASE_META_KEYS | set(declared)
    return sorted(k for k in meta if k not in allowed)


def is_finite_array(value: Any) -> bool:
    """True when every number in ``value`` (array, list, scalar) is finite."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(arr).all())
