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


#: Set to ``0`` to write patient-derived outputs and site-only models with the umask's mode (like any other file)
#: instead of readable by their owner only (0600).
PRIVATE_OUTPUTS_ENV = "FEDBRATS_PRIVATE_OUTPUTS"


def private_outputs() -> bool:
    """Whether files holding patient-derived data or site-only models are written mode 0600 (the default)."""
    return os.environ.get(PRIVATE_OUTPUTS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def write_atomic(path: str, write: Callable[[str], None], suffix: str = ".tmp", private: bool = False) -> None:
    """Write a file through ``write(temporary_path)`` and ``os.replace``, so readers never see half a file.

    The new file replaces the name, never the old file's content: writing onto a hard link or a symbolic link of
    another file leaves that file as it was.

    Args:
        path: the file to write (its folder exists).
        write: writes the whole content to the path it is given.
        suffix: the temporary file's suffix (writers that choose a format by the name, as nibabel does, need it).
        private: the file holds patient-derived data or a site-only model: mode 0600 (unless
            :data:`PRIVATE_OUTPUTS_ENV` says 0), else the umask's.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; the files must be readable as the umask allows (a site client may run as another
        # user of the group), like any file this user writes.
        os.chmod(tmp, 0o600 if private and private_outputs() else 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same path after links, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_output_file(out: str, inputs: Mapping[str, str], overwrite: bool = False, option: str = "--out") -> str:
    """Check an output file's path before any work: never one of ``inputs`` (by any link), never an existing file
    without ``overwrite``, never a folder.

    Args:
        out: the output path.
        inputs: what each input is (e.g. ``{"flair": path}``), for the message.
        overwrite: an existing file (not an input) may be replaced.
        option: the command-line option that named ``out``.

    Raises:
        ValueError: naming the option and the reason.
    """
    for what, path in inputs.items():
        if same_file(out, path):
            raise ValueError(f"{option} {out!r} is the {what} input (or a link to it): writing it would destroy it")
    if os.path.isdir(out):
        raise ValueError(f"{option} {out!r} is a folder; give a file name")
    if os.path.lexists(out) and not overwrite:
        raise ValueError(f"{option} {out!r} already exists; choose another name or pass --overwrite")
    return out


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
