"""``python -m benchmark suite ...``: the entry point, and the commands that run cells (``run``, ``run-cell``,
``export-sweep``); the reading ones (``status``, ``paper-table``, ``list``) are in :mod:`.reading`.

Each command loads the suite file, checks the output folder and parses every selected cell's
configuration with the CLI's own parser before it touches a run directory. This module imports
the launchers (submitit, torch) and the run builder: the heavy half of the suite command.
"""

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
)
from benchmark.app.suites.fields import SuiteError, _minutes, _Problems
from benchmark.app.suites.launchers import default_parallel, run_here, run_slurm
from benchmark.app.suites.reading import _parse_args
from benchmark.app.suites.spec import load_suite
from benchmark.app.suites.state import cell_state, plan_cell, refuse_changed
from benchmark.app.suites.sweep import export_sweep
from benchmark.app.suites.validation import check_output, run_lock, validate_cells


# ---------------------------------------------------------------------------- entry point
def main(argv: list[str]) -> int:
    """``python -m benchmark suite ...``; user errors become SuiteError (exit 2 in cli.main).

    Returns:
        The command's exit code (docs/leaderboard.md, Suites); 0 for ``--help``.
    """
    # The reading commands too: `python -m benchmark` sends them to reading.main before the heavy
    # imports, but cli.main(["suite", "status", ...]) arrives here.
    commands: dict[str, Callable[[list[str]], int]] = {
        "run": _cmd_run, "run-cell": _cmd_run_cell, "export-sweep": _cmd_export, **reading.COMMANDS,
    }
    return reading.dispatch(argv, commands)


def _cmd_run(argv: list[str]) -> int:
    """``suite run FILE``: validate the selected cells, then run them (or list them, ``--dry-run``).

    The refusals come first and start nothing: a bad ``--max-parallel``, ``--launcher slurm``
    where ``sbatch`` is missing, an unwritable output folder, a cell whose configuration the
    CLI's parser refuses, a second ``suite run`` of the same output folder (the run lock) and an
    interrupted cell whose options changed since it ran (:func:`.state.refuse_changed`).

    Returns:
        0 when every selected cell completed, 1 when some did not, 130 / 143 when stopped by
        SIGINT / SIGTERM; 0 for ``--dry-run`` and for a SLURM submission without ``--wait``.

    Raises:
        SuiteError: on any of the refusals above.
    """
    args = _parse_args("run", argv)
    suite = load_suite(args.file, args.output)
    cells = _selected(suite, args.only)
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SuiteError("--max-parallel must be at least 1.")
    # Checked up front, like every refusal: before the validation (which parses every
    # configuration) and the lock, not at the first submission.
    if args.launcher == "slurm" and not args.dry_run and shutil.which("sbatch") is None:
        raise SuiteError("--launcher slurm needs SLURM's sbatch, which is not on this machine's PATH: run the "
                         "command on the cluster's login node, or use --launcher local (this machine, in parallel).")
    # A dry run only reads: it must not create the output folder it reports on.
    check_output(suite.output, create=not args.dry_run)
    validate_cells(suite, cells)
    if args.dry_run:
        return dry_run(suite, cells, args.retry_failed, args.restart_changed)
    with run_lock(suite.output):
        # The states are read under the lock: read before it, another run could still be
        # starting the same pending cells. Every cell's state is read (not only the selected
        # ones), because a selected cell's plan depends on the states of the cells it needs.
        states = {c.id: cell_state(suite, c) for c in suite.cells}
        refuse_changed(suite, {c.id: plan_cell(suite, c, args.retry_failed, states, args.restart_changed) for c in cells})
        if args.launcher == "slurm":
            return run_slurm(suite, cells, args.retry_failed, args.wait, restart_changed=args.restart_changed)
        # serial and local are one path: submitit jobs on this machine, one at a time or several.
        parallel = 1 if args.launcher == "serial" else args.max_parallel or default_parallel(cells)
        return run_here(suite, cells, args.retry_failed, parallel, restart_changed=args.restart_changed,
                        launcher=args.launcher)


def _cmd_run_cell(argv: list[str]) -> int:
    """``suite run-cell FILE --cell ID``: one cell with the suite's rules (what a sweep agent runs).

    Only that cell's configuration is parsed, and no run lock is taken: the agents of a W&B
    sweep run different cells of one output folder at the same time, by design.

    Returns:
        The fit's exit code, or that of :func:`.commands.wait_for_needs` when a cell this one
        needs has not completed (0: skipped because it cannot complete, recorded as blocked;
        1: the wait ran out; 130: Ctrl-C while waiting).

    Raises:
        SuiteError: an unknown cell id, a ``--wait-needs`` that is not a duration, or the
            refusals of ``suite run`` that concern this cell.
    """
    args = _parse_args("run-cell", argv)
    suite = load_suite(args.file, args.output)
    cell = suite.cell(args.cell)
    text = str(args.wait_needs).strip()
    # A bare number on the command line is a string: make it a number so that _minutes reads it
    # as minutes, as it reads `time: 90` in a suite file.
    given: Any = float(text) if re.fullmatch(r"\d+(\.\d+)?", text) else text  # minutes, or 90m / 4h / D-HH:MM:SS
    problems = _Problems(suite.path)
    # _minutes refuses 0 (a resource time must be positive), but 0 is a valid answer here: no wait.
    minutes = 0.0 if given == 0 else _minutes(given, "--wait-needs", problems)
    if problems.items:
        raise SuiteError(f"suite run-cell: {problems.items[0]}")
    wait = (minutes or 0.0) * 60
    check_output(suite.output, create=True)
    validate_cells(suite, [cell])
    return run_one(suite, cell, args.retry_failed, restart_changed=args.restart_changed, wait_needs_s=wait)


def _cmd_export(argv: list[str]) -> int:
    """``suite export-sweep FILE``: write (or print) a W&B grid sweep whose agents run the cells.

    ``FILE`` is written into the sweep as given (its ``program``): the agents resolve it from
    the folder they are started in.
    """
    args = _parse_args("export-sweep", argv)
    suite = load_suite(args.file)
    cells = _selected(suite, args.only)
    validate_cells(suite, cells)
    return export_sweep(suite, cells, args.file, args.out)
