"""Small helpers used across the package (one definition each)."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Write a file through ``write(temporary_path)`` and ``os.replace``, so readers never see half a file.

    Args:
        path: the file to write (its folder exists).
        write: writes the whole content to the path it is given.
        suffix: the temporary file's suffix (writers that choose a format by the name, as nibabel does, need it).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; the files must be readable as the umask allows (a site client may run as another
        # user of the group), like any file this user writes.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (:func:`write_atomic`) and synced to disk."""

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())

    write_atomic(path, dump)


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
