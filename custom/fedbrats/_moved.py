"""Class paths that moved, so that job configurations and exported model folders naming an old path still work.

The architecture step that gave each method one folder (FedKD's network, losses, strategy and filter now live in
``fedbrats.federated.methods.fedkd``, MST-KD's in ``...mstkd``) and put the scoring blocks below the federated
layer moved modules that jobs, NVFlare and MONAI bundles name by their dotted path. This table maps the old paths to
the new ones in one place: :func:`install` lets ``import`` find an old module under its old name (NVFlare and MONAI
import a component's module by name), :func:`moved_attribute` lets a module that kept its name hand out a class
that left it, and :func:`current_path` gives the registries (:mod:`fedbrats.registry`) the path a moved class is
registered under. Only these fixed strings are redirected: nothing here imports what a file names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: Whole modules that moved: old dotted name -> new one.
MOVED_MODULES: dict[str, str] = {
    "fedbrats.evaluation.metrics": "fedbrats.scoring.metrics",
    "fedbrats.evaluation.inference": "fedbrats.scoring.inference",
    "fedbrats.evaluation.postprocess": "fedbrats.scoring.postprocess",
    "fedbrats.evaluation.detection": "fedbrats.scoring.detection",
    "fedbrats.federated.simulate": "fedbrats.simulate",
    "fedbrats.networks.modality_aware": "fedbrats.federated.methods.fedkd.network",
    "fedbrats.networks.mstkd": "fedbrats.federated.methods.mstkd.network",
    "fedbrats.losses.drl": "fedbrats.federated.methods.fedkd.drl",
    "fedbrats.losses.rcl": "fedbrats.federated.methods.fedkd.rcl",
    "fedbrats.losses.mstkd": "fedbrats.federated.methods.mstkd.losses",
}
#: Classes that left a module which kept its name: old path -> new path.
MOVED_NAMES: dict[str, str] = {
    "fedbrats.federated.server.aggregation.ModalityAwareAggregation": (
        "fedbrats.federated.methods.fedkd.strategy.ModalityAwareAggregation"
    ),
    "fedbrats.federated.filters.PrototypePrivacyFilter": (
        "fedbrats.federated.methods.fedkd.privacy.PrototypePrivacyFilter"
    ),
}


def current_path(path: Any) -> Any:
    """The path a class is defined at now, for a path that moved; anything else unchanged."""
    if not isinstance(path, str) or "." not in path:
        return path
    if path in MOVED_NAMES:
        return MOVED_NAMES[path]
    module, attr = path.rsplit(".", 1)
    return f"{MOVED_MODULES[module]}.{attr}" if module in MOVED_MODULES else path


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a module of :data:`MOVED_MODULES` under its old name: the module object is the new module."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module is already imported."""


def install() -> None:
    """Let ``import`` find the moved modules under their old names (once per process)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())


def moved_attribute(module_name: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that hands out the classes :data:`MOVED_NAMES` moved out of
    ``module_name``."""

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module hook's name
        new = MOVED_NAMES.get(f"{module_name}.{name}")
        if new is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        module, attr = new.rsplit(".", 1)
        return getattr(importlib.import_module(module), attr)

    return __getattr__


__all__ = ["MOVED_MODULES", "MOVED_NAMES", "current_path", "install", "moved_attribute"]
