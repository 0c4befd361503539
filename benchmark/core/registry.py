"""Lookup by name and plugin discovery, over the registries of :mod:`benchmark.core.contracts`.

Built-in methods and datasets register themselves (``@register_method`` /
``@register_dataset`` of ``benchmark.core.contracts``) when their module is imported; :func:`discover`
imports every module of the ``methods`` and ``datamodules`` packages (by name, at run time:
this module has no static import of them, so it sits below the methods), then the entry
points of the groups ``benchmark.methods`` / ``benchmark.datasets`` / ``benchmark.backbones``
(installed plugins), then any module named with ``--plugin``. :func:`discover_tools` adds
the perf commands, analyses and figures; every registered figure is also an ``analyze``
command, drawn by the runner the command line registers (benchmark/app/analysis.py). A new method therefore never
edits the framework.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points

from benchmark.core.contracts import (
    ANALYSES,
    DATASETS,
    FIGURES,
    METHODS,
    PERF_COMMANDS,
    Command,
    UnknownNameError,
    register_dataset,
    register_method,
)
from benchmark.core.errors import PluginError

__all__ = [
    "METHODS", "DATASETS", "PERF_COMMANDS", "ANALYSES", "FIGURES", "UnknownNameError", "register_method", "register_dataset",
    "discover", "discover_tools", "get_method", "get_dataset", "get_command", "class_path",
]

# The packages of perf commands and analyses: the framework's own (benchmark/app/perf) and the
# companions of particular methods and datasets (companions/intra_batch_perf.py...). Imported by
# :func:`discover_tools` only, so that a fit never imports its tools (they sit in the top layer:
# they may build a whole CLI run).
TOOL_PACKAGES = ("benchmark.app.perf", "companions")
# Draws a registered figure from a checkpoint (``analyze NAME``) and registers ``analyze figures``;
# the top layer, so it is imported by name, like the tools.
# How ``analyze NAME`` draws a registered figure: set by the command line (benchmark/app/analysis.py's
# figure_main), so that this low layer names no upper one.
_figure_runner: Callable[[str, list[str]], int] | None = None


def set_figure_runner(runner: Callable[[str, list[str]], int]) -> None:
    """Register what draws a figure for ``analyze NAME`` (``runner(name, argv)``)."""
    global _figure_runner
    _figure_runner = runner

_builtins_loaded = False
_tools_loaded = False
_loaded_entry_points: set[str] = set()


def _import_modules(package: str, wanted: Callable[[str], bool]) -> None:
    """Import the public modules of ``package`` whose name ``wanted`` accepts."""
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not info.name.startswith("_") and wanted(info.name):
            importlib.import_module(f"{package}.{info.name}")


def _load_entry_points(groups: tuple[str, ...]) -> None:
    """Import the installed plugins of ``groups`` not imported yet (re-scanned on every call)."""
    for group in groups:
        for ep in entry_points(group=group):
            key = f"{group}:{ep.name}={ep.value}"
            if key not in _loaded_entry_points:
                try:
                    ep.load()
                except Exception as err:
                    raise PluginError(f"Plugin entry point {ep.name!r} ({ep.value}) in group {group} failed to load: {err}") from err
                _loaded_entry_points.add(key)


def discover(plugins: list[str] | tuple[str, ...] = ()) -> None:
    """Import built-ins (once), installed entry-point plugins and the named plugin modules.

    Entry points are re-scanned on every call (cheap), so a plugin installed while the
    process runs is found by the next call.
    """
    global _builtins_loaded
    if not _builtins_loaded:
        for package in ("datamodules", "methods"):
            _import_modules(package, lambda name: True)
        _builtins_loaded = True
    _load_entry_points(("benchmark.methods", "benchmark.datasets", "benchmark.backbones"))
    for module in plugins:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise PluginError(f"Cannot import plugin module {module!r} (--plugin): {err}") from err


def discover_tools(plugins: list[str] | tuple[str, ...] = ()) -> None:
    """:func:`discover`, then the modules that register perf commands and analyses.

    Built-in tools live in ``benchmark/app/perf`` (framework-wide ones) and in ``companions/``
    (those of one method or dataset: ``<name>_perf`` / ``<name>_analysis``); installed plugins add
    theirs through the entry-point groups ``benchmark.perf`` / ``benchmark.analysis``.
    """
    global _tools_loaded
    discover(plugins)
    if not _tools_loaded:
        for package in TOOL_PACKAGES:
            _import_modules(package, lambda name: True)
        _tools_loaded = True
    _load_entry_points(("benchmark.perf", "benchmark.analysis"))
    _add_figure_commands()


class FigureCommand:
    """``analyze NAME`` for a registered figure: the runner :func:`set_figure_runner` registered."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, argv: list[str]) -> int:
        if _figure_runner is None:
            raise RuntimeError("No figure runner is registered: import benchmark.app.analysis (the command line does).")
        return _figure_runner(self.name, argv)


def _add_figure_commands() -> None:
    """Every registered figure becomes an ``analyze`` command of the same name and summary."""
    for name, figure in FIGURES.items():
        command = ANALYSES.get(name)
        if command is None:
            scope = f" ({', '.join(figure.methods)} runs)" if figure.methods else ""
            ANALYSES[name] = Command(name, FigureCommand(name), f"figure: {figure.summary}{scope}", figure.owner)
        elif not isinstance(command.run, FigureCommand):
            raise ValueError(f"Figure name {name!r} ({figure.owner}) is already an analysis of {command.owner}.")


def get_command(kind: str, name: str) -> Command:
    """The registered ``perf`` or ``analyze`` command ``name`` (after :func:`discover_tools`)."""
    table = PERF_COMMANDS if kind == "perf" else ANALYSES
    if name not in table:
        raise UnknownNameError(
            f"Unknown {kind} command {name!r}. Registered: {', '.join(sorted(table)) or 'none'} "
            f"(python -m benchmark {kind} --help describes them)."
        )
    return table[name]


def get_method(name: str) -> type:
    discover()
    if name not in METHODS:
        raise UnknownNameError(f"Unknown method {name!r}. Registered methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def get_dataset(name: str) -> type:
    discover()
    if name not in DATASETS:
        raise UnknownNameError(f"Unknown dataset {name!r}. Registered datasets: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
