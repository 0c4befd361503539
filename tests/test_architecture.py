"""Imports flow one way: parsed from the source (ast), not from what happens to be imported.

The layers are folders (docs/architecture.md), bottom to top; a module may import its own layer
and the layers below it, never above, and project modules form no cycle:

0. ``benchmark/core/``: contracts, registries and lookup, errors, I/O, validation, run records
1. ``benchmark/nn/`` (backbones, attention, neighbour search, gathers) and ``datamodules/``
2. ``methods/``: one method per file (and their shared base), nothing else
3. ``benchmark/engine/``: evaluation, training lifecycle, figures, the W&B logger
4. ``benchmark/app/`` (the commands) and ``companions/`` (the perf benchmarks and analyses of
   one method or dataset); ``benchmark/__main__.py`` is the entry point above them all.

Project imports sit at the top of a module: an import inside a function body hides an edge
from readers (and from this test), so only third-party modules may be imported lazily.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "methods", "datamodules", "companions")
# The layer of each folder: a module's layer is its folder's, read from where the file lives.
LAYERS = {"benchmark.core": 0, "benchmark.nn": 1, "datamodules": 1, "methods": 2, "benchmark.engine": 3,
          "benchmark.app": 4, "companions": 4}
ENTRY = {"benchmark": 5, "benchmark.__main__": 5}  # the package file and the entry point, above everything


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def layer(module: str) -> int:
    if module in ENTRY:
        return ENTRY[module]
    for folder, number in sorted(LAYERS.items(), key=lambda item: -len(item[0])):
        if module == folder or module.startswith(folder + "."):
            return number
    raise AssertionError(f"{module} lives in no layer folder: move it into one of {sorted(LAYERS)} "
                         "(tests/test_architecture.py, docs/architecture.md)")


def test_every_module_lives_in_a_layer_folder() -> None:
    assert sorted(m for m in MODULES if m not in ENTRY and not any(
        m == f or m.startswith(f + ".") for f in LAYERS)) == []


def test_methods_holds_methods_only() -> None:
    """methods/ is one method per file (and their base): perf and analysis companions live in companions/."""
    others = [m for m, path in MODULES.items() if m.startswith("methods.") and m != "methods.base"
              and "@register_method(" not in path.read_text()]
    assert others == []


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (``benchmark.core.contracts.METHODS`` -> ``benchmark.core.contracts``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" for alias in node.names]  # resolves to base when not a submodule
    return {r for r in map(_resolve, names) if r and r != module}


def _parse(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))


@functools.cache
def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        graph[module] = set()
        for node in ast.walk(_parse(module)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _imported(module, node)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_project_modules() -> None:
    assert find_cycles(import_graph()) == []


def test_imports_never_go_up_a_layer() -> None:
    upward = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in sorted(import_graph().items())
        for d in sorted(deps)
        if layer(d) > layer(m)
    ]
    assert upward == []


def test_the_core_imports_only_leaf_modules() -> None:
    for leaf in ("benchmark.core.errors", "benchmark.core.io", "benchmark.core.validation", "benchmark.core.contracts"):
        deps = import_graph()[leaf]
        assert deps <= {"benchmark.core.errors"}, (leaf, deps)


# The entry point checks the environment before the CLI's heavy import (matplotlib raises on import
# with an invalid MPLBACKEND) and imports only what a command uses (light commands start without torch):
# its deferred imports are the reason it exists.
DEFERRED = {
    "benchmark.__main__.main: from benchmark.app.cli import main as cli_main",
    "benchmark.__main__._light: from benchmark.core.defaults import DEFAULT_DATA, DEFAULT_METHOD, USAGE",
    "benchmark.__main__._light: from benchmark.app.status import main as status_main",
    "benchmark.__main__._light: from benchmark.app.leaderboard import main as leaderboard_main",
    "benchmark.__main__._light: from benchmark.app.listing import main as list_main",
    "benchmark.__main__._light: from benchmark.app.suites.reading import main as suite_reading_main",
}


def test_project_imports_sit_at_the_top_of_modules() -> None:
    nested = []
    for module in MODULES:
        for fn in ast.walk(_parse(module)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _imported(module, node):
                        nested.append(f"{module}.{fn.name}: {ast.unparse(node)}")
    assert sorted(set(nested) - DEFERRED) == []


@pytest.mark.parametrize("package", ["benchmark"])
def test_the_framework_names_no_method(package: str) -> None:
    """No file under benchmark/ imports a method module or names a registered method."""
    from benchmark.core import registry
    registry.discover()
    builtin = {name for name, cls in registry.METHODS.items() if cls.__module__.startswith("methods.")}
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith(package):
            continue
        if any(d.startswith("methods") for d in import_graph()[module]) and layer(module) < 4:
            offenders.append(f"{module} imports a method module")
        text = path.read_text()
        for name in builtin:
            if f'"{name}"' in text or f"'{name}'" in text:
                offenders.append(f"{module} names the method {name!r}")
    assert offenders == []


def test_no_module_changes_global_state_at_import() -> None:
    """Importing a library module must not change the process's warning filters or matplotlib's backend
    (#27): filters are installed where they apply (a trainer being built, an evaluator set up, around a
    call) and figures draw on their own Agg canvases."""
    offenders = []
    for module in MODULES:
        for node in _parse(module).body:  # statements at module level only
            call = node.value if isinstance(node, ast.Expr) else None
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and \
                    call.func.attr in ("filterwarnings", "simplefilter", "use") and \
                    ast.unparse(call.func.value) in ("warnings", "matplotlib"):  # fmt: skip
                offenders.append(f"{module}: {ast.unparse(call)[:80]}")
    assert offenders == []


def test_no_cycle_is_dodged_by_importing_by_name() -> None:
    """A project module is imported with an import statement, not ``importlib.import_module("benchmark.x")``
    or ``__import__`` of a constant name (that hid the cli <-> suites cycle from this test), and no lower
    layer names a module of a higher one in a string (the registry named benchmark.app.analysis). Discovery
    by package (the registry importing every module of ``methods``) goes through variables and stays."""
    offenders = []
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    for module in MODULES:
        tree = _parse(module)
        # Entry-point group names ("benchmark.analysis") are a plugin API, not module references.
        groups = {id(c) for call in ast.walk(tree) if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("entry_points")
                  for c in ast.walk(call) if isinstance(c, ast.Constant)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("importlib.import_module", "import_module", "__import__") and node.args and \
                        isinstance(node.args[0], ast.Constant) and _resolve(str(node.args[0].value)):  # fmt: skip
                    offenders.append(f"{module}: {ast.unparse(node)}")
            if isinstance(node, ast.Constant) and id(node) not in groups and isinstance(node.value, str) and node.value in MODULES \
                    and node.value not in packages and node.value != module and layer(node.value) > layer(module):  # fmt: skip
                offenders.append(f"{module} names the higher-layer module {node.value!r}")
    assert offenders == []


MAX_LINES = 800  # issue #27: a module a reader can hold in mind; split along a seam beyond this


def test_no_module_is_longer_than_800_lines() -> None:
    long = {m: n for m, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"
