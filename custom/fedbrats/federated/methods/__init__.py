"""Federated methods, one module each, registered here.

A method's module (``fedbrats/federated/methods/<name>.py``) holds its client side (a :class:`ClientMethod`: the
loss of a batch, what it does with the server's extras, what it sends) and declares, as ``METHOD``
(:class:`~fedbrats.federated.methods.base.Method`), the names its jobs use for it, its aggregation strategy,
its network, its job defaults and its experiments. This package finds every such module of its folder, so adding a
method adds its module (and its tests and docs page) and nothing else: the client registry :data:`METHODS`, the
jobs (:data:`JOBS`, written by :mod:`fedbrats.jobgen`) and the experiment driver's :data:`EXPERIMENTS` derive from
the modules. A job's ``method`` is a name (or the class path) of :data:`METHODS`, never an arbitrary import path.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from fedbrats.federated.methods.base import ClientMethod, Job, Method
from fedbrats.registry import Registry


def _method_modules() -> list[Method]:
    """``METHOD`` of every module of this folder that declares one (in module-name order)."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found.append(method)
    return found


#: Every method module's declaration.
METHOD_DEFINITIONS: tuple[Method, ...] = tuple(_method_modules())


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _register_own_classes() -> None:
    """Add the networks and strategies the method modules declare to their registries."""
    from fedbrats.networks import NETWORKS

    for method in METHOD_DEFINITIONS:
        for name, cls in method.networks.items():
            NETWORKS.register(name, _class_path(cls))
    if any(method.strategies for method in METHOD_DEFINITIONS):
        from fedbrats.federated.server.aggregation import STRATEGIES

        for method in METHOD_DEFINITIONS:
            for name, cls in method.strategies.items():
                STRATEGIES.register(name, _class_path(cls))


_register_own_classes()


def _unique(pairs: list[tuple[str, Any]], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out and out[name] != value:
            raise ValueError(f"{what} {name!r} is declared by two method modules")
        out[name] = value
    return out


#: The client methods a job may name (see :mod:`fedbrats.registry`).
METHODS: Registry[ClientMethod] = Registry(
    "method",
    ClientMethod,
    _unique(
        [(name, _class_path(cls)) for method in METHOD_DEFINITIONS for name, cls in method.clients.items()],
        "client method",
    ),
)
#: Every job of every method: name -> its definition (what :mod:`fedbrats.jobgen` writes into ``jobs/<name>``).
JOBS: dict[str, dict[str, Any]] = _unique(
    [(job.name, job.definition()) for method in METHOD_DEFINITIONS for job in method.jobs], "job"
)


#: Every method's runs for the experiment driver: name -> (job, training overrides, aggregation overrides).
EXPERIMENTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = _unique(
    [
        (name, (job, dict(training), dict(aggregation)))
        for method in METHOD_DEFINITIONS
        for name, (job, training, aggregation) in method.experiments.items()
    ],
    "experiment",
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


__all__ = ["EXPERIMENTS", "JOBS", "METHODS", "ClientMethod", "Job", "Method", "build_method", "register_method"]
