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
    """argparse with its errors raised as :class:`ListError` instead of printed with the usage.

    argparse's own ``error`` prints the usage and calls ``sys.exit(2)``; raising a user error
    instead lets the dispatcher report it as every other command's: one paragraph, exit 2.
    """

    def error(self, message: str):  # type: ignore[override]
        """Raise the parse error as a :class:`ListError` that points at ``--help``."""
        raise ListError(f"list: {message}. `python -m benchmark list --help` lists the options.")


def main(argv: list[str]) -> int:
    """Print the three tables; ``--plugin MODULE`` (repeatable) adds a plugin's registrations.

    Args:
        argv: the arguments after ``list``: ``--plugin MODULE`` any number of times.

    Returns:
        0 (the tables are printed to stdout).

    Raises:
        ListError: an unknown option or a missing value.
        PluginError: a ``--plugin`` module cannot be imported (from :func:`~benchmark.core.catalog.catalog`).
    """
    # Imported here: rich is only needed once the command runs, and importing this module stays cheap.
    from rich.table import Table

    parser = _Parser(prog="python -m benchmark list", description="The registered methods, backbones and datasets.")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers methods, datasets or backbones)")
    args = parser.parse_args(argv)
    found = catalog(args.plugin)
    console = make_console()
    # The class path is what a recipe or a config.yaml names (`--model methods.dmcac.DMCAC`).
    table = Table(title="methods (--method)")
    for column in ("name", "description", "class"):
        table.add_column(column)
    for name, entry in sorted(found.methods.items()):
        table.add_row(name, entry.description, entry.class_path)
    console.print(table)
    # A backbone name is a preset (benchmark.core.presets): a timm model plus its pooling.
    table = Table(title="backbones (--backbone)")
    for column in ("name", "timm model", "pool", "description"):
        table.add_column(column)
    for name, preset in sorted(found.backbones.items()):
        table.add_row(name, preset.timm_name, preset.pool, preset.description)
    console.print(table)
    # Recall@K: the K values the dataset's papers report, which the evaluation uses unless told otherwise.
    table = Table(title="datasets (--data)")
    for column in ("name", "Recall@K", "description"):
        table.add_column(column)
    for name, entry in sorted(found.datasets.items()):
        table.add_row(name, ", ".join(map(str, entry.recall_ks)), entry.description)
    console.print(table)
    return 0
