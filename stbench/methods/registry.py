"""Method registry: built-ins and any package exposing the `stbench.methods` entry-point group.

A third-party package registers `name = "module:Class"` under `[project.entry-points."stbench.methods"]`
and its method is found exactly like ours (no `__subclasses__()` scanning, which misses
grandchildren and unimported modules).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from stbench.errors import StbenchError, UnknownNameError
from stbench.methods.base import KINDS, TASKS, Method

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False


def register_method(cls: type[Method]) -> type[Method]:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise StbenchError(f"{cls!r} is not a stbench.Method subclass")
    if not cls.name:
        raise StbenchError(f"{cls.__name__} has no `name`")
    if cls.task not in TASKS:
        raise StbenchError(f"{cls.__name__}.task must be one of {TASKS}, got {cls.task!r}")
    if cls.kind not in KINDS:
        raise StbenchError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for ep in entry_points(group="stbench.methods"):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must say which one
            raise StbenchError(
                f"cannot load method {ep.name!r} from entry point {ep.value!r}: {exc}"
            ) from exc
        if getattr(cls, "name", None) != ep.name:
            raise StbenchError(f"entry point {ep.name!r} points to {cls!r} whose name is {cls.name!r}")
        register_method(cls)


def available_methods() -> dict[str, type[Method]]:
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise UnknownNameError("method", name, list(methods))
    return methods[name]
