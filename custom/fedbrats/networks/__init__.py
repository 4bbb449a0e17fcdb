"""Segmentation networks shared by the methods, and the registry every network is built from.

:func:`build_network` builds one from a config name, as jobs and CLIs do. A method's own network lives in its folder
and is registered when :mod:`fedbrats.federated.methods` is imported (which every builder of a job's model does).
"""

from __future__ import annotations

from typing import Any

import torch

from fedbrats.networks.segresnet import BraTSSegResNet
from fedbrats.registry import Registry

#: The network classes a name, a job or a model file may build (see :mod:`fedbrats.registry`): nothing else is
#: ever imported from a spec, however it names itself.
NETWORKS: Registry[torch.nn.Module] = Registry(
    "network",
    torch.nn.Module,
    # The shared network; each method's own network is registered from its folder by fedbrats.federated.methods.
    {"segresnet": "fedbrats.networks.segresnet.BraTSSegResNet"},
)


#: Largest network a model spec may describe (parameters). The package's networks have 0.5-20 M; a spec comes from
#: files and from the server, so one asking for far more is refused before anything is allocated.
MAX_PARAMETERS = 200_000_000


def register_network(name: str, class_path: str) -> None:
    """Make a network class (a ``torch.nn.Module`` subclass) buildable by name and by its path."""
    NETWORKS.register(name, class_path)


def network_class_path(name: str) -> str:
    """Import path of a registered network, as NVFlare component configs need it.

    Raises:
        ValueError: ``name`` is not registered.
    """
    return NETWORKS.path(name)


def build_network(name: str, **kwargs: Any) -> torch.nn.Module:
    """Instantiate a registered network with keyword arguments (JSON values only, see :mod:`fedbrats.registry`)."""
    return NETWORKS.build(name, kwargs)


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


def build_from_spec(spec: Any) -> torch.nn.Module:
    """Inverse of :func:`model_spec`: only registered network classes are built, with JSON arguments.

    A spec comes from model folders and from the server at every round, so it is treated as untrusted input.

    Raises:
        ValueError: the spec is not ``{"path": ..., "args": {...}}``, names an unregistered class, or has an
            argument of another type than a JSON scalar or list (the path is named).
    """
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec must be a JSON object with 'path' and 'args', got {type(spec).__name__}")
    path, args = spec.get("path"), spec.get("args", {})
    # Sized first without memory (PyTorch's meta device): a spec may ask for a network too large to build.
    with torch.device("meta"):
        size = sum(p.numel() for p in NETWORKS.build(path, args).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(
            f"model spec {path!r} with {args} describes a network of {size:,} parameters, over {MAX_PARAMETERS:,}; "
            "refusing to build it"
        )
    return NETWORKS.build(path, args)


__all__ = [
    "MAX_PARAMETERS",
    "NETWORKS",
    "BraTSSegResNet",
    "build_from_spec",
    "build_network",
    "model_spec",
    "network_class_path",
    "register_network",
]
