"""The top layer is documented at least as densely as the methods (#27): docstrings and comments per line.

Density = (docstring lines + comment lines) / non-blank lines, over every module of a folder, read
with ast and tokenize (pragmas such as ``# noqa`` and ``# fmt: skip`` are not comments). The
methods are the reference: a reader of the commands should find as much explanation as a reader of
a method does.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRAGMAS = ("noqa", "fmt:", "type: ignore", "pragma:")


def density(paths: list[Path]) -> float:
    documented = nonblank = 0
    for path in paths:
        source = path.read_text()
        doc: set[int] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                    doc.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
        comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT and not any(p in tok.string for p in PRAGMAS)}  # fmt: skip
        documented += len(doc | comments)
        nonblank += sum(1 for line in source.splitlines() if line.strip())
    return documented / max(nonblank, 1)


def test_the_top_layer_is_documented_as_densely_as_the_methods() -> None:
    methods = density(sorted((ROOT / "methods").glob("*.py")))
    top = {"benchmark/app": sorted((ROOT / "benchmark" / "app").rglob("*.py")),
           "companions": sorted((ROOT / "companions").glob("*.py"))}  # fmt: skip
    assert methods > 0.2  # not vacuous: the methods are documented
    measured = {name: density(paths) for name, paths in top.items()}
    thin = {name: round(value, 3) for name, value in measured.items() if value < methods}
    assert thin == {}, f"documentation density below the methods' {methods:.3f}: {thin}"


def test_the_density_counts_docstrings_and_comments_not_pragmas(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('"""Doc."""\n\nx = 1  # a comment\ny = 2  # noqa: E501\n\n\ndef f():\n    return x\n')
    assert density([module]) == 2 / 5
