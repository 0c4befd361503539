"""Methods, datasets and backbones by name, and plugin discovery.

Built-in methods and datasets register themselves when their module is imported; the
registry imports every module of the ``methods`` and ``datamodules`` packages, then the
entry points of the groups ``benchmark.methods`` / ``benchmark.datasets`` (installed
plugins), then any module named with ``--plugin``. A new method therefore never edits the
framework: it decorates its class with :func:`register_method`.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, TypeVar

from benchmark.errors import UserError

if TYPE_CHECKING:
    from datamodules.base import RetrievalDataModule
    from methods.base import RetrievalMethod

METHODS: dict[str, type[RetrievalMethod]] = {}
DATASETS: dict[str, type[RetrievalDataModule]] = {}

M = TypeVar("M")


class UnknownNameError(UserError, KeyError):
    """A name that is not registered; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0])


def register_method(name: str):
    """Class decorator: make a :class:`RetrievalMethod` subclass available as ``--method name``."""

    def wrap(cls: M) -> M:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"Method name {name!r} is already registered by {METHODS[name].__module__}.")
        cls.method_name = name  # type: ignore[attr-defined]
        METHODS[name] = cls  # type: ignore[assignment]
        return cls

    return wrap


def register_dataset(cls: M) -> M:
    """Class decorator: make a datamodule available as ``--data <cls.name>``."""
    name = cls.name  # type: ignore[attr-defined]
    if not name:
        raise ValueError(f"{cls} must set a class attribute `name` to be registered.")
    DATASETS[name] = cls  # type: ignore[assignment]
    return cls


_builtins_loaded = False
_loaded_entry_points: set[str] = set()


def discover(plugins: list[str] | tuple[str, ...] = ()) -> None:
    """Import built-ins (once), installed entry-point plugins and the named plugin modules.

    Entry points are re-scanned on every call (cheap), so a plugin installed while the
    process runs is found by the next call.
    """
    global _builtins_loaded
    if not _builtins_loaded:
        for package in ("datamodules", "methods"):
            pkg = importlib.import_module(package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{package}.{info.name}")
        _builtins_loaded = True
    for group in ("benchmark.methods", "benchmark.datasets", "benchmark.backbones"):
        for ep in entry_points(group=group):
            key = f"{group}:{ep.name}={ep.value}"
            if key not in _loaded_entry_points:
                try:
                    ep.load()
                except Exception as err:
                    raise ImportError(f"Plugin entry point {ep.name!r} ({ep.value}) in group {group} failed to load: {err}") from err
                _loaded_entry_points.add(key)
    for module in plugins:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"Cannot import plugin module {module!r} (--plugin): {err}") from err


def get_method(name: str) -> type[RetrievalMethod]:
    discover()
    if name not in METHODS:
        raise UnknownNameError(f"Unknown method {name!r}. Registered methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def get_dataset(name: str) -> type[RetrievalDataModule]:
    discover()
    if name not in DATASETS:
        raise UnknownNameError(f"Unknown dataset {name!r}. Registered datasets: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
