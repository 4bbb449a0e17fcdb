"""Checks a site's update must pass before it may enter the global model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedbrats.federated.protocol import is_finite_array, undeclared_meta_keys


def update_problem(
    global_params: dict[str, np.ndarray],
    params: dict[str, Any] | None,
    meta: dict[str, Any],
    declared: set[str],
    may_omit: Callable[[str], bool] | None = None,
) -> str | None:
    """Why an update must be rejected, or None when it is acceptable.

    Rejects: no weights, missing weights (other than those ``may_omit`` allows this site to leave out),
    unexpected weight names, wrong shapes, NaN/Inf weights, meta items that the method did not declare, and
    non-finite numeric extras.
    """
    if not params:
        return "the update holds no weights"
    missing = sorted(k for k in set(global_params) - set(params) if may_omit is None or not may_omit(k))
    if missing:
        return f"{len(missing)} weight(s) missing, e.g. {missing[:3]}"
    extra = sorted(set(params) - set(global_params))
    if extra:
        return f"{len(extra)} unexpected weight(s), e.g. {extra[:3]}"
    for key, value in params.items():
        ref = global_params[key]
        value = np.asarray(value)
        if value.shape != np.shape(ref):
            return f"weight {key!r} has shape {value.shape}, expected {np.shape(ref)}"
        if not np.isfinite(value).all():
            return f"weight {key!r} holds NaN or Inf"
    undeclared = undeclared_meta_keys(meta, declared)
    if undeclared:
        return f"undeclared items in the update: {undeclared}"
    for key in declared:
        if key in meta and not is_finite_array(meta[key]):
            return f"item {key!r} is not a finite numeric array"
    return None
