"""The NVFlare task-result filter every site runs last: an audit trail of what leaves it.

A method's own filters live in its folder (FedKD's privacy filter for its prototypes:
:mod:`fedbrats.federated.methods.fedkd.privacy`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedbrats._moved import moved_attribute
from fedbrats.runs import PAYLOAD_AUDIT_FILE


def describe(value: Any) -> dict[str, Any]:
    """What a payload item is, without its content: type, shape, dtype (or the scalar, for numbers)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return {"type": type(value).__name__, "shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, bool | int | float) or value is None:
        return {"type": type(value).__name__, "value": value}
    if isinstance(value, str):
        return {"type": "str", "length": len(value)}
    if isinstance(value, dict):
        return {"type": "dict", "items": {str(k): describe(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        arr = np.asarray(value, dtype=object)
        return {"type": type(value).__name__, "shape": list(arr.shape)}
    return {"type": type(value).__name__}


class PayloadAuditFilter(Filter):
    """Append to ``<site run dir>/payload_audit.jsonl`` one line per result the site sends: the data kind, every
    weight's name/shape/dtype, and every meta item's description (no values but scalars).

    A privacy officer can read exactly what left the site, round by round; the project's tests assert on it.
    As the first task-data filter of a site (``file_name``
    :data:`fedbrats.federated.protocol.PAYLOAD_AUDIT_IN_FILE`) it records what arrived.

    Args:
        file_name: the file in the site's run folder.

    Raises:
        ValueError: ``file_name`` is empty or holds a path separator.
    """

    def __init__(self, file_name: str = PAYLOAD_AUDIT_FILE) -> None:
        super().__init__()
        if not file_name or os.sep in file_name or (os.altsep and os.altsep in file_name):
            raise ValueError(f"file_name must be a plain file name, got {file_name!r}")
        self.file_name = file_name

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable  # not a model result (e.g. an error reply): nothing to audit
        data = dxo.data or {}
        record = {
            "time": time.time(),
            "site": fl_ctx.get_identity_name(),
            "task": shareable.get_header("task_name", ""),
            "round": shareable.get_header("current_round"),
            "kind": dxo.data_kind,
            "data": {str(k): describe(v) for k, v in data.items()},
            "meta": {str(k): describe(v) for k, v in (dxo.meta or {}).items()},
        }
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        with open(os.path.join(run_dir, self.file_name), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        return shareable


# Classes that moved to a method folder stay reachable under their old path (fedbrats._moved).
__getattr__ = moved_attribute(__name__)
