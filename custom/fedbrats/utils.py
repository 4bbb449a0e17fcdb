"""Small helpers used across the package (one definition each)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, recursively where both hold a dict under the same key.

    Neither argument is changed: the result holds deep copies, so that editing a merged job config never edits
    the shared defaults it came from.

    Args:
        base: the defaults.
        override: the values that win; a dict value is merged into ``base``'s dict under the same key, any other
            value replaces it.

    Returns:
        The merged mapping as a new dict.
    """
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
