"""Client-side methods: what a site optimises each round and what extra it sends.

A method is named in the job config (``"method": "fedavg"``); sibling methods register theirs with
:func:`register_method` (or by adding to ``_METHODS``), so the trainer never changes to gain a method.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedbrats.federated.methods.base import ClientMethod

_METHODS: dict[str, str] = {
    "supervised": "fedbrats.federated.methods.supervised.SupervisedMethod",
    "fedavg": "fedbrats.federated.methods.supervised.SupervisedMethod",
    "fedkd": "fedbrats.federated.methods.fedkd.FedKDMethod",
    "mstkd": "fedbrats.federated.methods.mstkd.MSTKDMethod",
}


def register_method(name: str, class_path: str) -> None:
    """Make a client method available by name."""
    _METHODS[name] = class_path


def build_method(name: str, **kwargs: Any) -> ClientMethod:
    """Instantiate the method ``name`` with its keyword arguments (loss weights and options).

    Raises:
        ValueError: unknown method name.
        ImportError: a dotted path that does not import.
    """
    # A dotted path names a method class outside this package (a site's or a researcher's own plug-in).
    path = _METHODS.get(name) or (name if "." in name else None)
    if path is None:
        raise ValueError(f"method must be one of {sorted(_METHODS)} or a 'module.Class' path, got {name!r}")
    module_name, cls_name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**kwargs)


__all__ = ["ClientMethod", "build_method", "register_method"]
