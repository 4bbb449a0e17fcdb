"""Client-side methods: what a site optimises each round and what extra it sends.

A method is named in the job config (``"method": "fedavg"``); sibling methods register theirs with
in code with :func:`register_method`, so the trainer never changes to gain a method.
"""

from __future__ import annotations

from typing import Any

from fedbrats.federated.methods.base import ClientMethod
from fedbrats.registry import Registry

#: The client methods a job may name (see :mod:`fedbrats.registry`): a job's ``method`` is a name (or the class
#: path) of this registry, never an arbitrary import path.
METHODS: Registry[ClientMethod] = Registry(
    "method",
    ClientMethod,
    {
        "supervised": "fedbrats.federated.methods.supervised.SupervisedMethod",
        "fedavg": "fedbrats.federated.methods.supervised.SupervisedMethod",
        "fedkd": "fedbrats.federated.methods.fedkd.FedKDMethod",
        "mstkd": "fedbrats.federated.methods.mstkd.MSTKDMethod",
    },
)


def register_method(name: str, class_path: str) -> None:
    """Make a client method (a :class:`ClientMethod` subclass) available by name; a plug-in calls this in code."""
    METHODS.register(name, class_path)


def build_method(name: str, **kwargs: Any) -> ClientMethod:
    """Instantiate the method ``name`` with its keyword arguments (loss weights and options).

    Raises:
        ValueError: a method that is not registered, or arguments it does not take or of a non-JSON type.
    """
    return METHODS.build(name, kwargs)


__all__ = ["METHODS", "ClientMethod", "build_method", "register_method"]
