"""``python -m benchmark suite ...``: the entry point, and the commands that run cells (``run``, ``run-cell``,
``export-sweep``); the reading ones (``status``, ``paper-table``, ``list``) are in :mod:`.reading`."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from typing import Any

from benchmark.app.suites import reading
from benchmark.app.suites.commands import (
    _selected,
    dry_run,
    run_one,
    run_serial,
)
from benchmark.app.suites.launchers import run_submitit
from benchmark.app.suites.reading import _parse_args
from benchmark.app.suites.spec import (
    EXIT_OK,
    USAGE,
    SuiteError,
    _closest,
    _minutes,
    _Problems,
    load_suite,
)
from benchmark.app.suites.state import cell_state, plan_cell, refuse_changed
from benchmark.app.suites.sweep import export_sweep
from benchmark.app.suites.validation import check_output, run_lock, validate_cells


# ---------------------------------------------------------------------------- entry point
def main(argv: list[str]) -> int:
    """``python -m benchmark suite ...``; user errors become SuiteError (exit 2 in cli.main)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    commands: dict[str, Callable[[list[str]], int]] = {
        "run": _cmd_run, "run-cell": _cmd_run_cell, "export-sweep": _cmd_export, **reading.COMMANDS,
    }
    if command not in commands:
        raise SuiteError(f"Unknown suite command {command!r}.{_closest(command, commands)} "
                         f"Choose one of: {', '.join(commands)}.")
    try:
        return commands[command](rest)
    except SystemExit as exit_:  # --help of a suite command
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK


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


def _cmd_export(argv: list[str]) -> int:
    args = _parse_args("export-sweep", argv)
    suite = load_suite(args.file)
    cells = _selected(suite, args.only)
    validate_cells(suite, cells)
    return export_sweep(suite, cells, args.file, args.out)
