"""Segmentation networks. :func:`build_network` builds one from a config name, as jobs and CLIs do."""

from __future__ import annotations

from typing import Any

import torch

from fedbrats.networks.segresnet import BraTSSegResNet

_NETWORKS = {
    "segresnet": "fedbrats.networks.segresnet.BraTSSegResNet",
    "modality_aware": "fedbrats.networks.modality_aware.ModalityAwareSegNet",
    "mstkd": "fedbrats.networks.mstkd.MSTKDNet",
}


def register_network(name: str, class_path: str) -> None:
    """Make a network class buildable by name (sibling methods add theirs)."""
    _NETWORKS[name] = class_path


def network_class_path(name: str) -> str:
    """Import path of a registered network, as NVFlare component configs need it."""
    try:
        return _NETWORKS[name]
    except KeyError:
        raise ValueError(f"network must be one of {sorted(_NETWORKS)}, got {name!r}") from None


def build_network(name: str, **kwargs: Any) -> torch.nn.Module:
    """Instantiate a registered network with keyword arguments."""
    import importlib

    module_name, cls_name = network_class_path(name).rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**kwargs)


def model_spec(model: torch.nn.Module) -> dict[str, Any]:
    """``{"path": ..., "args": ...}`` that rebuilds ``model`` (its constructor arguments, read off attributes).

    The package's networks store each constructor argument under its own name, which is what makes this work
    (and what NVFlare's persistor needs as well).
    """
    import inspect

    cls = type(model)
    args: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(model, name):
            raise ValueError(f"{cls.__name__} does not store constructor argument {name!r}; cannot describe it")
        value = getattr(model, name)
        args[name] = list(value) if isinstance(value, tuple) else value
    return {"path": f"{cls.__module__}.{cls.__qualname__}", "args": args}


def build_from_spec(spec: dict[str, Any]) -> torch.nn.Module:
    """Inverse of :func:`model_spec`; only classes inside this package are accepted."""
    import importlib

    path = spec.get("path", "")
    if not path.startswith("fedbrats."):
        raise ValueError(f"model path must be a fedbrats network, got {path!r}")
    module_name, cls_name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**spec.get("args", {}))


__all__ = ["BraTSSegResNet", "build_from_spec", "build_network", "model_spec", "network_class_path", "register_network"]
