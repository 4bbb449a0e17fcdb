"""The package's one builder of objects named by a dotted path, and the registries it builds from.

Model folders (``metadata.json``, ``model_spec.json``), job configs and the server's per-round ``model_spec`` all
name classes by a dotted path. A file can come from anywhere (a shared model folder, a server at another
institution), so a path is never imported and called as such: only classes registered here by name, in code,
are built, they must subclass the registry's base class, and their arguments must be plain JSON values (numbers,
strings, booleans, null and lists of them), bound to the constructor's declared parameters before it runs.
Anything else is refused with a ``ValueError`` naming the path.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from fedbrats._moved import current_path

T = TypeVar("T")

_SCALARS = (str, int, float, bool, type(None))


def check_json_args(args: Any, where: str) -> dict[str, Any]:
    """``args`` as a dict after checking that it maps names to JSON scalars or (nested) lists of them.

    Args:
        args: constructor arguments as read from a file or a message.
        where: what is being built, for the error message (e.g. the dotted path).

    Raises:
        ValueError: ``args`` is not a mapping of names, or a value is another type (a dict, an object...).
    """
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}: arguments must be a JSON object, got {type(args).__name__}")

    def ok(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(ok(v) for v in value)
        return isinstance(value, _SCALARS)

    for name, value in args.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{where}: argument name {name!r} is not a valid name")
        if not ok(value):
            raise ValueError(
                f"{where}: argument {name!r} must be a number, string, boolean, null or a list of them, "
                f"got {type(value).__name__}"
            )
    return dict(args)


class Registry(Generic[T]):
    """Classes that may be built by name or by their registered dotted path.

    Args:
        kind: what the registry holds, for messages (``"network"``, ``"method"``).
        base: every registered class must subclass it (checked when it is built).
        entries: name -> ``"module.Class"`` registered from the start (the method modules add their own networks
            and strategies when :mod:`fedbrats.federated.methods` is imported).

    A path that moved (:mod:`fedbrats._moved`) is looked up under the path its class has now.
    """

    def __init__(self, kind: str, base: type, entries: Mapping[str, str]) -> None:
        self.kind = kind
        self.base = base
        self._paths: dict[str, str] = {}
        for name, path in entries.items():
            self.register(name, path)

    def register(self, name: str, class_path: str) -> None:
        """Allow ``class_path`` to be built, under ``name`` and under its own path.

        Raises:
            ValueError: the name or the path is malformed.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if not isinstance(class_path, str) or "." not in class_path:
            raise ValueError(f"{self.kind} {name!r}: class path must look like 'module.Class', got {class_path!r}")
        self._paths[name] = class_path

    @property
    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._paths)

    def path(self, name_or_path: Any) -> str:
        """The dotted path of a registered name or of a registered path itself.

        Raises:
            ValueError: neither a registered name nor a registered path (the value is named).
        """
        if isinstance(name_or_path, str):
            if name_or_path in self._paths:
                return self._paths[name_or_path]
            path = current_path(name_or_path)
            if path in self._paths.values():
                return path
        raise ValueError(
            f"{self.kind} {name_or_path!r} is not a registered {self.kind}: only {self.names} (or their class "
            f"paths {sorted(set(self._paths.values()))}) can be built; refusing to import anything else"
        )

    def resolve(self, name_or_path: Any) -> type:
        """The registered class behind a name or path, after checking it subclasses the registry's base.

        Raises:
            ValueError: not registered, or what the path names is not a ``base`` subclass.
        """
        path = self.path(name_or_path)
        module_name, attr = path.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"registered {self.kind} {path!r} cannot be imported: {exc}") from exc
        if not (inspect.isclass(cls) and issubclass(cls, self.base)):
            raise ValueError(f"{self.kind} {path!r} is not a {self.base.__module__}.{self.base.__qualname__} class")
        return cls

    def build(self, name_or_path: Any, args: Any = None) -> T:
        """Instantiate a registered class with checked JSON arguments.

        Args:
            name_or_path: a registered name or class path.
            args: keyword arguments (JSON values only); ``None`` for none.

        Raises:
            ValueError: an unregistered name or path, an argument of another type, or arguments the constructor
                does not take (each message names the path).
        """
        cls = self.resolve(name_or_path)
        path = self.path(name_or_path)
        kwargs = check_json_args({} if args is None else args, path)
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as exc:
            raise ValueError(f"{self.kind} {path!r}: {exc}") from None
        return cls(**kwargs)


__all__ = ["Registry", "check_json_args"]
