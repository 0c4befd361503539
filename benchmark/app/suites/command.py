"""``python -m benchmark suite ...``: the sub-commands' parsers and the entry point."""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmark.app import paper_tables
from benchmark.app.suites.commands import (
    WAIT_NEEDS_MINUTES,
    _selected,
    dry_run,
    run_one,
    run_serial,
    show_status,
)
from benchmark.app.suites.launchers import run_submitit
from benchmark.app.suites.spec import (
    EXIT_OK,
    USAGE,
    Cell,
    SuiteError,
    _closest,
    _minutes,
    _Problems,
    load_suite,
    shipped_suites,
)
from benchmark.app.suites.state import cell_state, plan_cell, refuse_changed
from benchmark.app.suites.sweep import export_sweep
from benchmark.app.suites.validation import check_output, run_lock, validate_cells
from benchmark.core.defaults import recipe_dir
from benchmark.core.errors import UserError
from benchmark.core.io import console as make_console


# ---------------------------------------------------------------------------- entry point
def _parser(command: str) -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=f"python -m benchmark suite {command}", add_help=True)
    parser.add_argument("file", help="suite file or the name of a shipped suite")
    if command in ("run", "status", "run-cell"):
        parser.add_argument("--output", help="the suite's output folder (default: output: in the file)")
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
    def error(self, message: str):  # type: ignore[override]
        command = self.prog.rsplit(" ", 1)[-1]
        raise SuiteError(f"suite {command}: {message}. `python -m benchmark suite {command} --help` lists the options.")


def _parse_args(command: str, argv: list[str]) -> argparse.Namespace:
    return _parser(command).parse_args(argv)


def main(argv: list[str]) -> int:
    """``python -m benchmark suite ...``; user errors become SuiteError (exit 2 in cli.main)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    commands: dict[str, Callable[[list[str]], int]] = {
        "run": _cmd_run, "run-cell": _cmd_run_cell, "status": _cmd_status, "export-sweep": _cmd_export, "list": _cmd_list,
        "paper-table": _cmd_paper_table,
    }
    if command not in commands:
        raise SuiteError(f"Unknown suite command {command!r}.{_closest(command, commands)} "
                         f"Choose one of: {', '.join(commands)}.")
    try:
        return commands[command](rest)
    except SystemExit as exit_:  # --help of a suite command
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK


def cell_recipe(cell: Cell) -> Path | None:
    """The recipe a cell's fit applies (its own --config/--recipe, else configs/<method>/<dataset>.yaml)."""
    given = cell.options.get("recipe") or cell.options.get("config")
    if given == "none":
        return None
    path = Path(str(given)) if given else recipe_dir() / cell.method / f"{cell.dataset}.yaml"
    return path if path.is_file() else None


def _cmd_paper_table(argv: list[str]) -> int:
    """``suite paper-table FILE``: the paper's tables in its order, our numbers beside them, uncovered cells marked."""
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


def _cmd_run(argv: list[str]) -> int:
    args = _parse_args("run", argv)
    suite = load_suite(args.file, args.output)
    cells = _selected(suite, args.only)
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SuiteError("--max-parallel must be at least 1.")
    if args.launcher == "slurm" and not args.dry_run and shutil.which("sbatch") is None:
        raise SuiteError("--launcher slurm needs SLURM's sbatch, which is not on this machine's PATH: run the "
                         "command on the cluster's login node, or use --launcher local (this machine, in parallel).")
    check_output(suite.output, create=not args.dry_run)
    validate_cells(suite, cells)
    if args.dry_run:
        return dry_run(suite, cells, args.retry_failed, args.restart_changed)
    with run_lock(suite.output):
        states = {c.id: cell_state(suite, c) for c in suite.cells}
        refuse_changed(suite, {c.id: plan_cell(suite, c, args.retry_failed, states, args.restart_changed) for c in cells})
        if args.launcher == "serial":
            return run_serial(suite, cells, args.retry_failed, restart_changed=args.restart_changed)
        return run_submitit(suite, cells, args.retry_failed, args.launcher, args.wait, args.max_parallel,
                            restart_changed=args.restart_changed)


def _cmd_run_cell(argv: list[str]) -> int:
    args = _parse_args("run-cell", argv)
    suite = load_suite(args.file, args.output)
    cell = suite.cell(args.cell)
    text = str(args.wait_needs).strip()
    given: Any = float(text) if re.fullmatch(r"\d+(\.\d+)?", text) else text  # minutes, or 90m / 4h / D-HH:MM:SS
    problems = _Problems(suite.path)
    minutes = 0.0 if given == 0 else _minutes(given, "--wait-needs", problems)
    if problems.items:
        raise SuiteError(f"suite run-cell: {problems.items[0]}")
    wait = (minutes or 0.0) * 60
    check_output(suite.output, create=True)
    validate_cells(suite, [cell])
    return run_one(suite, cell, args.retry_failed, restart_changed=args.restart_changed, wait_needs_s=wait)


def _cmd_status(argv: list[str]) -> int:
    args = _parse_args("status", argv)
    suite = load_suite(args.file, args.output)
    return show_status(suite, _selected(suite, args.only))


def _cmd_export(argv: list[str]) -> int:
    args = _parse_args("export-sweep", argv)
    suite = load_suite(args.file)
    cells = _selected(suite, args.only)
    validate_cells(suite, cells)
    return export_sweep(suite, cells, args.file, args.out)
