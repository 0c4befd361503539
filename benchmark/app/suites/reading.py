"""The suite commands that only read: ``suite status``, ``suite paper-table``, ``suite list``.

They parse the suite file and read the cells' run records, and nothing else: no run builder, no
launcher, so they start without torch, timm or Lightning (``python -m benchmark`` dispatches them
here before the heavy imports). The other commands (``run``, ``run-cell``, ``export-sweep``) are in
:mod:`benchmark.app.suites.command`, which shares this module's parsers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from benchmark.app import paper_tables
from benchmark.app.suites.commands import WAIT_NEEDS_MINUTES, _selected, show_status
from benchmark.app.suites.fields import SuiteError, _closest
from benchmark.app.suites.spec import EXIT_OK, USAGE, Cell, load_suite, shipped_suites
from benchmark.core.defaults import recipe_dir
from benchmark.core.errors import UserError
from benchmark.core.io import console as make_console


# ---------------------------------------------------------------------------- parsers
def _parser(command: str) -> argparse.ArgumentParser:
    """The argparse parser of one suite command (``run``, ``run-cell``, ``status``, ...).

    One builder for every command, so that an option shared by several (``--output``,
    ``--only``, ``--retry-failed``) is spelt and explained the same everywhere; the heavy
    commands (:mod:`.command`) import it from this light module.
    """
    parser = _ArgumentParser(prog=f"python -m benchmark suite {command}", add_help=True)
    parser.add_argument("file", help="suite file or the name of a shipped suite")
    if command in ("run", "status", "run-cell"):
        parser.add_argument("--output", help="the suite's output folder (default: output: in the file)")
    # export-sweep takes no --output: the agents run `run-cell FILE`, which reads output: from the file.
    if command in ("run", "status", "export-sweep"):
        parser.add_argument("--only", action="append", default=[], help="selector, e.g. dataset=cub,seed=0")
    if command in ("run", "run-cell"):
        parser.add_argument("--retry-failed", action="store_true", help="start failed cells again")
        parser.add_argument("--restart-changed", action="store_true",
                            help="start cells whose options changed since they ran again from scratch")
    if command == "run":
        parser.add_argument("--dry-run", action="store_true", help="list the cells and their commands")
        parser.add_argument("--launcher", choices=("serial", "local", "slurm"), default="serial")
        parser.add_argument("--max-parallel", type=int, default=None, help="local launcher: cells at once")
        parser.add_argument("--wait", action="store_true", help="slurm: wait for the jobs")
    if command == "run-cell":
        parser.add_argument("--cell", required=True, help="the cell id (suite run --dry-run lists them)")
        # Kept as text: command.py reads it as minutes or a duration, as resources.time is read.
        parser.add_argument("--wait-needs", default=f"{WAIT_NEEDS_MINUTES // 60}h",
                            help="how long to wait for the cells this one needs (90, '90m', '4h'; 0: not at all)")
    if command == "export-sweep":
        parser.add_argument("--out", help="write the sweep config here (default: stdout)")
    if command == "paper-table":
        parser.add_argument("--output", help="the suite's output folder (default: output: in the file)")
        parser.add_argument("--table", action="append", default=None,
                            help="only this table of the paper (repeatable; default: every table the suite reproduces)")
    return parser


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as :class:`SuiteError` instead of printed with ``exit(2)``.

    The CLI then reports a bad suite option like any other user error (one ``error:`` line,
    exit 2) and the message says which ``--help`` lists the options.
    """
    def error(self, message: str):  # type: ignore[override]
        """Raise ``message`` (argparse's wording) as a SuiteError naming the command.

        Raises:
            SuiteError: always; argparse expects ``error`` never to return.
        """
        command = self.prog.rsplit(" ", 1)[-1]  # prog is "python -m benchmark suite <command>"
        raise SuiteError(f"suite {command}: {message}. `python -m benchmark suite {command} --help` lists the options.")


def _parse_args(command: str, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by :func:`_parser` for ``command``.

    Raises:
        SuiteError: an unknown option or a bad value (``--help`` exits through SystemExit,
            which the entry points turn into exit 0).
    """
    return _parser(command).parse_args(argv)


def cell_recipe(cell: Cell) -> Path | None:
    """The recipe a cell's fit applies (its own --config/--recipe, else configs/<method>/<dataset>.yaml).

    ``suite paper-table`` reads the backbone and embedding size a cell trains with from it
    when the cell's options do not give them. None for ``recipe: none`` and when the file
    does not exist.
    """
    given = cell.options.get("recipe") or cell.options.get("config")
    if given == "none":
        return None
    if given == "auto":  # what `fit --recipe auto` means: the shipped recipe of the method and dataset
        given = None
    path = Path(str(given)) if given else recipe_dir() / cell.method / f"{cell.dataset}.yaml"
    return path if path.is_file() else None


def _cmd_paper_table(argv: list[str]) -> int:
    """``suite paper-table FILE``: the paper's tables in its order, ours beside them, uncovered cells marked.

    The rendering is :mod:`benchmark.app.paper_tables`; this command adds the suite's file,
    output folder and ``--table`` choice.

    Raises:
        SuiteError: the suite names no ``paper:``, or the tables asked for hold none of its
            numbers.
    """
    args = _parse_args("paper-table", argv)
    suite = load_suite(args.file, args.output)
    if suite.paper is None:
        raise SuiteError(f"{suite.path} names no paper: add paper: NAME and reproduces: entries (docs/leaderboard.md).")
    found = paper_tables.lines(suite, cell_recipe, args.table)
    if not found:
        raise SuiteError(f"{suite.path}: no number of {suite.paper} in the tables asked for ({args.table}).")
    paper_tables.render(suite, found, make_console())
    return EXIT_OK


def _cmd_list(argv: list[str]) -> int:
    """``suite list``: every shipped suite with its number of cells and the first line of its description.

    A shipped suite that no longer loads (a registry name renamed, a plugin missing) is listed
    as invalid with the reason instead of failing the whole listing.
    """
    from rich.table import Table

    table = Table(title="suites (python -m benchmark suite run NAME)")
    table.add_column("name")
    table.add_column("cells", justify="right")
    table.add_column("description")
    for name, path in shipped_suites().items():
        try:
            suite = load_suite(path)
            count, text = str(len(suite.cells)), suite.description.splitlines()[0] if suite.description else ""
        except UserError as err:
            count, text = "?", f"(invalid: {err})"
        table.add_row(name, count, text)
    make_console().print(table)
    return EXIT_OK



def _cmd_status(argv: list[str]) -> int:
    """``suite status FILE``: the table of cells, their states and what changed (no lock needed).

    It only reads the run directories, so it can run beside a ``suite run`` of the same folder,
    or on another machine that sees it.
    """
    args = _parse_args("status", argv)
    suite = load_suite(args.file, args.output)
    return show_status(suite, _selected(suite, args.only))


#: The reading commands, by name (``python -m benchmark`` runs these without the heavy imports).
COMMANDS: dict[str, Callable[[list[str]], int]] = {"status": _cmd_status, "paper-table": _cmd_paper_table, "list": _cmd_list}


def main(argv: list[str]) -> int:
    """``python -m benchmark suite status|paper-table|list ...`` (user errors: SuiteError, exit 2).

    What ``python -m benchmark`` calls for these three commands before importing torch;
    :func:`benchmark.app.suites.command.main` serves them too.

    Raises:
        SuiteError: an unknown command (with the closest reading one) or any user error of
            the command.
    """
    return dispatch(argv, COMMANDS)


def dispatch(argv: list[str], commands: dict[str, Callable[[list[str]], int]]) -> int:
    """Run ``argv[0]`` of ``commands`` with the rest of ``argv``: the one dispatch of every suite command.

    Args:
        argv: the command's name, then its arguments; empty or ``--help`` prints the usage.
        commands: the commands this entry point serves, by name.

    Returns:
        The command's exit code; 0 after ``--help``.

    Raises:
        SuiteError: an unknown command (naming the closest one) or any user error of the command.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    if command not in commands:
        raise SuiteError(f"Unknown suite command {command!r}.{_closest(command, commands)} "
                         f"Choose one of: {', '.join(commands)}.")
    try:
        return commands[command](rest)
    except SystemExit as exit_:
        # argparse exits after printing --help (its errors are SuiteErrors: _ArgumentParser).
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
