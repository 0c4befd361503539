"""What the registries hold, read from the source instead of imported: names, classes, summaries.

``python -m benchmark list`` and ``suite status`` need the registered names (and the one line that
describes each), not the classes: importing the method and dataset modules to fill the registries
costs the whole deep-learning stack (torch, timm, Lightning: about 6 s on a 2-core CPU). So the
built-in modules of ``methods/`` and ``datamodules/`` are parsed (:mod:`ast`) for the classes
decorated with ``@register_method("name")`` / ``@register_dataset("name")``, with their
``description`` / ``recall_ks`` class attributes and docstrings. Plugins (entry points, ``--plugin``
modules) can register anything in any way, so when one is installed or named, the registries are
filled the normal way (:func:`benchmark.core.registry.discover`) and read instead.

``tests/benchmark/test_catalog.py`` checks that this reading equals the imported registries for
every built-in, so the two cannot drift: a registered class states its ``description`` /
``recall_ks`` as literals in its own body (or relies on its docstring's first line).
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from benchmark.core import registry
from benchmark.core.presets import BACKBONES, BackbonePreset

#: The entry-point groups whose plugins add methods, datasets or backbones (registry.discover loads them).
PLUGIN_GROUPS = ("benchmark.methods", "benchmark.datasets", "benchmark.backbones")
_DECORATORS = {"register_method": "methods", "register_dataset": "datasets"}


@dataclass(frozen=True)
class Entry:
    """One registered method or dataset: its name, class path and what ``list`` shows of it."""

    name: str
    class_path: str  # module.Class, as recipes and config.yaml name it
    description: str
    recall_ks: tuple[int, ...] = ()  # datasets: the K of Recall@K the papers report


@dataclass(frozen=True)
class Catalog:
    """Everything registered: methods and datasets by name, and the backbone presets."""

    methods: dict[str, Entry]
    datasets: dict[str, Entry]
    backbones: dict[str, BackbonePreset]


def _package_files(package: str) -> list[tuple[str, Path]]:
    """(module name, source file) of a package's public modules, found without importing them."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [(f"{package}.{path.stem}", path) for folder in spec.submodule_search_locations
            for path in sorted(Path(folder).glob("*.py")) if not path.stem.startswith("_")]  # fmt: skip


def _literal(node: ast.ClassDef, attribute: str) -> object:
    """The literal value assigned to ``attribute`` in the class body, or None."""
    for statement in node.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, ast.AnnAssign) and statement.value is not None else []  # fmt: skip
        if any(isinstance(t, ast.Name) and t.id == attribute for t in targets):
            try:
                return ast.literal_eval(statement.value)  # type: ignore[union-attr]
            except ValueError:
                return None
    return None


def _registered(module: str, path: Path) -> list[tuple[str, Entry]]:
    """(registry kind, entry) for each class of a source file decorated by a register function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if not isinstance(node, ast.ClassDef):
            continue
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                continue
            function = decorator.func.attr if isinstance(decorator.func, ast.Attribute) else getattr(decorator.func, "id", "")
            if function in _DECORATORS:
                docstring = (ast.get_docstring(node) or "").strip().splitlines()
                description = _literal(node, "description") or (docstring[0] if docstring else "")
                recall_ks = tuple(_literal(node, "recall_ks") or ())
                found.append((_DECORATORS[function], Entry(str(decorator.args[0].value), f"{module}.{node.name}",
                                                           str(description), recall_ks)))  # fmt: skip
    return found


def _from_registries() -> Catalog:
    """The catalog of the imported registries (after :func:`registry.discover`)."""
    def entry(name: str, cls: type, description: str) -> Entry:
        return Entry(name, registry.class_path(cls), description, tuple(getattr(cls, "recall_ks", ()) or ()))

    def first_line(cls: type) -> str:
        lines = (cls.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""

    methods = {n: entry(n, c, getattr(c, "description", "") or first_line(c)) for n, c in registry.METHODS.items()}
    datasets = {n: entry(n, c, first_line(c)) for n, c in registry.DATASETS.items()}
    return Catalog(methods, datasets, dict(BACKBONES))


def plugins_present(plugins: list[str] | tuple[str, ...] = ()) -> bool:
    """Whether a plugin is named or installed: then only importing can tell what it registers."""
    return bool(plugins) or any(len(entry_points(group=group)) for group in PLUGIN_GROUPS)


def catalog(plugins: list[str] | tuple[str, ...] = ()) -> Catalog:
    """What is registered: read from the built-in sources, or imported when a plugin is present."""
    if plugins_present(plugins):
        registry.discover(plugins)
        return _from_registries()
    tables: dict[str, dict[str, Entry]] = {"methods": {}, "datasets": {}}
    for package in ("methods", "datamodules"):
        for module, path in _package_files(package):
            for kind, found in _registered(module, path):
                tables[kind][found.name] = found
    return Catalog(tables["methods"], tables["datasets"], dict(BACKBONES))


def imported_catalog(plugins: list[str] | tuple[str, ...] = ()) -> Catalog:
    """The catalog of the registries filled by importing every built-in and plugin (the reference)."""
    registry.discover(plugins)
    return _from_registries()
