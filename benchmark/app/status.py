"""``python -m benchmark status``: the run directories under some folders and their states.

A light module (the results contract, rich): it starts without importing torch or Lightning.
The states are read through :func:`benchmark.core.results.run_state`, the one reading that the
leaderboard and ``suite status`` share, so a run is ``killed`` here exactly when it is there.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from benchmark.core.errors import UserError
from benchmark.core.io import console as make_console
from benchmark.core.results import RUN_RECORDS, STATES, RecordError, final_evaluation, read_record, run_state


def main(argv: list[str]) -> int:
    """``status [FOLDER ...]``: every run directory under the folders (default ``runs``) with its state.

    The state is the run's ``status.json`` checked against its process: a run whose status says
    running but whose process is gone on this host (``kill -9``, out of memory, a lost node) is shown
    as ``killed``, not running for ever.

    A run directory is any folder, at any depth, that holds one of the run records
    (``config.yaml``, ``status.json``, ``metrics_val.json``, ``metrics_test.json``); folders under a
    hidden one (a suite's ``.attempts/``, caches) are left out. The table shows, per run, its state,
    the command that wrote the status, the exit code, and the trained steps and R@1 (in percent) of
    its end-of-training test, never those of a later ``test --ckpt_path``.

    Args:
        argv: the arguments after ``status``: folders (run directories or folders of them) and
            ``--state STATE`` (one of :data:`~benchmark.core.results.STATES` or ``unknown``).

    Returns:
        0 (the table is printed to stdout).

    Raises:
        UserError: a folder given is not a folder.
    """
    # The first line of this docstring is the command's --help description.
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m benchmark status", description=main.__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, default=[Path("runs")], help="run directories or folders of them")
    parser.add_argument("--state", choices=(*STATES, "unknown"), help="only runs in this state")
    args = parser.parse_args(argv)
    runs: list[tuple[Path, str]] = []  # (folder, name shown: relative to the folder given)
    for folder in args.folders:
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; pass run directories or the folder that holds them (default runs/).")
        # Any record marks a run: a run that failed before its first evaluation has only its status.
        found = sorted({p.parent for name in RUN_RECORDS for p in folder.rglob(name)
                        if not any(part.startswith(".") for part in p.parent.relative_to(folder).parts)})  # fmt: skip
        runs += [(run, str(run.relative_to(folder)) if run != folder else str(folder)) for run in found]
    # Filtered before the title: it counts the runs the table shows (it counted every run found).
    shown = [(run, name, run_state(run)) for run, name in runs]
    shown = [row for row in shown if not args.state or row[2].state == args.state]
    title = f"{len(shown)} run(s)" + (f" {args.state}" if args.state else "") + f" in {', '.join(map(str, args.folders))}"
    if args.state:
        title += f" (of {len(runs)})"
    table = Table(title=title)
    for col in ("run", "state", "command", "exit", "steps", "final R@1", "updated", "reason"):
        table.add_column(col, overflow="fold")
    for run, name, state in shown:
        steps, r1 = "", ""
        # An unreadable results file leaves the two cells empty: the run's state is still worth a row.
        with contextlib.suppress(RecordError):
            record = read_record(run / "metrics_test.json") if (run / "metrics_test.json").is_file() else None
            final = final_evaluation(record) if record else None
            if final is not None:
                steps = str(final.get("global_step", ""))
                value = final["metrics"].get("R@1")
                r1 = f"{100 * value:.2f}" if isinstance(value, (int, float)) else ""
        table.add_row(name, state.state, state.command, "" if state.exit_code is None else str(state.exit_code),
                      steps, r1, state.updated, state.reason)  # fmt: skip
    make_console().print(table)
    return 0
