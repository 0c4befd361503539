"""``python -m benchmark list``: the registered methods, backbones and datasets, in three tables.

Light: the names and summaries come from :mod:`benchmark.core.catalog` (the built-in sources read
without importing them), so the command starts without torch, timm or Lightning; a ``--plugin``
module (or an installed plugin) is imported, because only importing it tells what it registers.
"""

from __future__ import annotations

import argparse

from benchmark.core.catalog import catalog
from benchmark.core.errors import UserError
from benchmark.core.io import console as make_console


class ListError(UserError, ValueError):
    """A bad option of ``list`` (exit 2, one paragraph)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise ListError(f"list: {message}. `python -m benchmark list --help` lists the options.")


def main(argv: list[str]) -> int:
    """Print the three tables; ``--plugin MODULE`` (repeatable) adds a plugin's registrations."""
    from rich.table import Table

    parser = _Parser(prog="python -m benchmark list", description="The registered methods, backbones and datasets.")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers methods, datasets or backbones)")
    args = parser.parse_args(argv)
    found = catalog(args.plugin)
    console = make_console()
    table = Table(title="methods (--method)")
    for column in ("name", "description", "class"):
        table.add_column(column)
    for name, entry in sorted(found.methods.items()):
        table.add_row(name, entry.description, entry.class_path)
    console.print(table)
    table = Table(title="backbones (--backbone)")
    for column in ("name", "timm model", "pool", "description"):
        table.add_column(column)
    for name, preset in sorted(found.backbones.items()):
        table.add_row(name, preset.timm_name, preset.pool, preset.description)
    console.print(table)
    table = Table(title="datasets (--data)")
    for column in ("name", "Recall@K", "description"):
        table.add_column(column)
    for name, entry in sorted(found.datasets.items()):
        table.add_row(name, ", ".join(map(str, entry.recall_ks)), entry.description)
    console.print(table)
    return 0
