"""Small helpers used across the package (one definition each)."""

from __future__ import annotations

import copy
import os
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


class FileTail:
    """Reads a text file as it grows: each :meth:`lines` returns the complete lines appended since the last call.

    A line still being written (no newline yet) waits for a later call, so a reader never sees half a line.

    Args:
        path: the file (it may not exist yet).
    """

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError(f"path must name a file, got {path!r}")
        self.path = path
        self._offset = 0
        self._partial = ""

    def lines(self) -> list[str]:
        """The complete lines appended since the last call, without their newlines (none while there is no file)."""
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        return lines
