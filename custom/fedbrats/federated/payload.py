"""What a site sends to the server, declared in one place and checked on both ends.

Nothing derived from a single patient's voxels leaves a site beyond these items: model weights, aggregate
validation metrics, counts, the site's sequence availability and, for methods that declare them, region
prototypes averaged over many voxels and cases.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Meta key of a site that cannot do its task: the one-line reason (its error message, cut to
#: :data:`SITE_ERROR_MAX_CHARS`), so that the server can name why a job stops. Sent instead of weights.
SITE_ERROR_KEY = "site_error"
SITE_ERROR_MAX_CHARS = 500

#: Meta keys every method may send.
BASE_META_KEYS: frozenset[str] = frozenset(
    {
        "site_name",
        SITE_ERROR_KEY,
        "modalities",  # the site's available sequences (names)
        "num_steps",  # optimisation steps this round (aggregation weight)
        "num_train_cases",
        "train_loss",  # mean training loss of the round
        "loss_terms",  # mean of each loss term of the round
        "lr",  # learning rate at the end of the round (the schedule is the job's, not the data's)
        "NUM_STEPS_CURRENT_ROUND",  # NVFlare's own key for the same count
        # Added by NVFlare's privacy filters on the way out: which filters ran and the privacy spent.
        "filter_history",
        "svt_privacy_budget",
        "svt_privacy_accountant",
    }
)

#: Metric keys (aggregate over the site's validation cases).
METRIC_PREFIX = "val_"


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
