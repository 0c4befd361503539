"""A cell's state on disk and what running it now does (skip, run, resume, retry, restart, wait, refuse).

The suite keeps no state of its own: a cell's state is read every time from its run directory,
the fit's ``status.json`` first (:func:`benchmark.core.results.run_state`, the same reading as
every reporter's) and the suite's ``suite.json`` second. A suite run that was killed, a second
machine sharing the output folder, or a W&B agent running one cell therefore all see the same
states, and ``suite run`` can always be run again to continue. Also here: SLURM's view of the
cells that were submitted (``jobs.json``, ``squeue``), which ``suite status`` adds to the table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.app.suites.fields import SuiteError
from benchmark.app.suites.spec import RECORD, Cell, Suite, _plural
from benchmark.core.errors import EXIT_SIGINT, EXIT_SIGTERM
from benchmark.core.results import RecordError, final_evaluation, read_record, run_state


# ---------------------------------------------------------------------------- cell states
@dataclass
class CellState:
    """A cell's state on disk: pending, running, completed, interrupted, failed, or blocked (a
    ``run-cell`` found that a cell it needs cannot complete and did not start it).

    ``changes`` lists the options that differ between the arguments the cell's folder was made
    with (``suite.json``'s ``argv``) and what the suite file gives now, as ``--opt old -> new``.

    Attributes:
        state: one of the states above.
        exit_code: the fit's exit code (``status.json``, else the last attempt's), None while
            running or never run.
        reason: why the cell is in this state, as the table's note shows it (the fit's
            reason, where it runs, or why it is blocked).
        checkpoint: ``checkpoints/last.ckpt`` when it exists: what an interrupted cell resumes from.
        attempts: attempts recorded in ``suite.json``.
        seconds: their total time, None before the first attempt.
        r_at_1: the final test R@1 in percent, as text (completed cells only).
        changes: see above; empty when unchanged or never run.
    """

    state: str
    exit_code: int | None = None
    reason: str = ""
    checkpoint: Path | None = None
    attempts: int = 0
    seconds: float | None = None
    r_at_1: str = ""
    changes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether the suite file now gives this cell other options than it ran with."""
        return bool(self.changes)


def _read_json(path: Path) -> dict[str, Any]:
    """``path`` as JSON, ``{}`` when it is missing or unreadable (a cell that never started has no record)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _argv_options(argv: list[str]) -> dict[str, list[str]]:
    """``fit`` arguments as the suite writes them (``--option value`` pairs) -> {option: [values]}
    (``--config`` and ``--plugin`` may repeat; their order counts).

    Only for :attr:`Cell.argv` lists, which are strictly flag, value, flag, value: a flag
    without a value (as a user might write ``--help``) would shift every pair after it."""
    options: dict[str, list[str]] = {}
    for flag, value in zip(argv[0::2], argv[1::2]):
        options.setdefault(flag.removeprefix("--"), []).append(value)
    return options


def argv_changes(recorded: list[str], now: list[str]) -> list[str]:
    """The options that differ between the ``fit`` arguments a cell ran with and those the suite
    file gives now, each ``--option old -> new`` (``(not set)`` where one side lacks it). Only
    values count: options written in another order in the file are the same configuration.
    The lines follow the recorded order, then come the options that are new."""
    before, after = _argv_options(list(recorded)), _argv_options(list(now))

    def shown(values: list[str] | None) -> str:
        return "(not set)" if values is None else " ".join(values)

    keys = [*before, *(key for key in after if key not in before)]
    return [f"--{key} {shown(before.get(key))} -> {shown(after.get(key))}"
            for key in keys if before.get(key) != after.get(key)]


def cell_state(suite: Suite, cell: Cell) -> CellState:
    """The cell's state: its run's ``status.json`` as :func:`benchmark.core.results.run_state` reads it
    (a run whose process died without a final status, "killed" there, is interrupted here:
    resumable from ``last.ckpt``), else what ``suite.json`` recorded (an attempt that ended before
    ``fit`` wrote a status; a cell that ``run-cell`` did not start because a cell it needs cannot
    complete), else pending.

    Reads only files (and, for a ``running`` status on this host, whether its pid is alive):
    cheap enough to call for every cell each time a plan is made.
    """
    run = suite.run_dir(cell)
    record = _read_json(run / RECORD)
    attempts = record.get("attempts", [])
    seconds = sum(a.get("seconds", 0.0) for a in attempts) if attempts else None
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = last if last.is_file() else None
    # No recorded arguments (never started, or only marked blocked): nothing to compare with.
    changes = tuple(argv_changes(record["argv"], cell.argv)) if record.get("argv") else ()
    common = {"attempts": len(attempts), "seconds": seconds, "checkpoint": checkpoint, "changes": changes}
    # The fit's own status first: it knows how the run ended (and a resumed run rewrites it).
    status = run_state(run)
    if status.state == "completed":
        return CellState("completed", 0, status.reason, r_at_1=_test_r1(run), **common)
    if status.state in ("interrupted", "failed"):
        return CellState(status.state, status.exit_code, status.reason, **common)
    if status.state == "killed":
        return CellState("interrupted", None, status.reason, **common)
    if status.state == "running":  # alive on this host, or on another host (which cannot be checked)
        return CellState("running", None, f"on {status.host} (pid {status.pid})", **common)
    # No usable status.json: the fit ended before writing one (an import error, a signal while it
    # started), so the suite's record of the attempt is all there is.
    if attempts and attempts[-1].get("exit_code") not in (None, 0):
        code = attempts[-1]["exit_code"]
        if code in (EXIT_SIGINT, EXIT_SIGTERM):  # stopped, not broken: the next run starts it again
            return CellState("interrupted", code, "stopped before the run started", **common)
        return CellState("failed", code, attempts[-1].get("reason") or f"exit {code}", **common)
    blocked = record.get("blocked")
    if isinstance(blocked, dict):
        return CellState("blocked", None, str(blocked.get("reason") or ""), **common)
    return CellState("pending", **common)


def _test_r1(run: Path) -> str:
    """The run's final test R@1 in percent (:func:`benchmark.core.results.final_evaluation`, not a later
    ``test --ckpt_path``), with the first refined R@1 after an arrow."""
    try:
        final = final_evaluation(read_record(run / "metrics_test.json"))
    except RecordError:
        return ""
    if final is None:
        return ""
    value = final["metrics"].get("R@1")
    text = f"{100 * value:.2f}" if isinstance(value, (int, float)) else ""
    for key, refined in (final.get("refined") or {}).items():
        if isinstance(refined.get("R@1"), (int, float)):
            text += f" → {100 * refined['R@1']:.2f} ({key})"
            break
    return text


@dataclass
class Plan:
    """What running a cell now does: skip, run (fresh), resume (--ckpt_path), retry (fresh, the
    failed attempt kept), restart (fresh because its options changed, the old attempt kept),
    report (failed), wait (running elsewhere), blocked (a cell it needs has not completed), or
    refuse (interrupted, but its options changed: resuming would mix two configurations).

    Attributes:
        action: one of the actions above; :data:`STARTS` are those that start a fit.
        state: the cell's state the plan was made from.
        ckpt: the checkpoint to pass as ``--ckpt_path`` (``resume`` only).
        note: why, for the progress lines, ``--dry-run`` and the summary table.
    """

    action: str
    state: CellState
    ckpt: Path | None = None
    note: str = ""


STARTS = ("run", "resume", "retry", "restart")  # the plans that start a fit


def plan_cell(suite: Suite, cell: Cell, retry_failed: bool, states: dict[str, CellState] | None = None,
              restart_changed: bool = False) -> Plan:
    """What running ``cell`` now does, from its state and its needs' states (``states``: already
    read, else read now). A cell whose options changed since it ran is never resumed: it is
    refused, or with ``restart_changed`` started again from scratch (completed ones too).

    The checks run in order of precedence: a running cell is never touched, a completed one
    is skipped unless it changed and may restart, a cell whose needs have not completed waits
    for them, and only then do the cell's own state and the flags (``retry_failed``:
    ``--retry-failed``) decide.
    """
    state = (states or {}).get(cell.id) or cell_state(suite, cell)
    changes = "; ".join(state.changes)
    changed = f"options changed: {changes}" if changes else ""

    def note(*parts: str) -> str:
        return "; ".join(p for p in parts if p)

    if state.state == "running":
        return Plan("wait", state, note=note(f"running {state.reason}", changed))
    if state.state == "completed" and not (state.changes and restart_changed):
        return Plan("skip", state, note=f"completed with other options: {changes} (--restart-changed runs it again)"
                    if changes else "completed")
    for need in cell.needs:
        need_state = (states or {}).get(need) or cell_state(suite, suite.cell(need))
        if need_state.state != "completed":
            return Plan("blocked", state, note=note(f"needs {need} ({need_state.state})", changed))
    if state.changes and restart_changed:
        return Plan("restart", state, note=f"start again from scratch: {changed}")
    if state.state == "interrupted":
        # Nothing to resume from: the folder holds a partial run that a fresh start must not
        # mix with, so it is started again like a retry (the old folder kept aside).
        if state.checkpoint is None:
            return Plan("retry", state, note=note("interrupted before its first checkpoint: start again", changed))
        if state.changes:
            return Plan("refuse", state, note=f"not resumed: {changed}; --restart-changed starts it again from scratch")
        return Plan("resume", state, ckpt=state.checkpoint, note=f"resume from {state.checkpoint.name}")
    if state.state == "failed":
        failed = f"failed: {state.reason or f'exit {state.exit_code}'}"
        if retry_failed:
            return Plan("retry", state, note=note(f"retry ({failed})", changed))
        return Plan("report", state, note=note(failed, changed))
    return Plan("run", state)  # pending, or blocked before and now free to run


def refuse_changed(suite: Suite, plans: dict[str, Plan]) -> None:
    """Raise when a cell would resume under options other than those it ran with.

    Resuming continues the checkpoint under the new options while the run's ``config.yaml``
    keeps the old ones: a result of neither configuration. The message names every such cell,
    what changed, and the two ways out.

    Raises:
        SuiteError: when any plan is ``refuse``; called before the first cell starts, so
            that nothing runs with a half-accepted file.
    """
    refused = [(cell_id, plan) for cell_id, plan in plans.items() if plan.action == "refuse"]
    if not refused:
        return
    cells = "; ".join(f"{cell_id}: {', '.join(plan.state.changes)}" for cell_id, plan in refused)
    raise SuiteError(
        f"{suite.path}: the suite file's options changed since {_plural(len(refused), 'interrupted cell')} ran "
        f"({cells}). Resuming would continue their checkpoints under the new options while their config.yaml keeps "
        f"the old ones, so nothing was started. Pass --restart-changed to start them again from scratch (the old "
        f"attempt is kept under {suite.output / '.attempts'}), or restore the old values in the file to resume them."
    )


def fit_command(suite: Suite, cell: Cell, plan: Plan) -> list[str]:
    """The cell's ``fit`` command for ``plan`` (``--ckpt_path`` when it resumes).

    The interpreter is the suite's own (``sys.executable``), so the fits run in the same
    environment (virtual environment, installed plugins) whatever ``python`` is on the PATH.
    """
    command = [sys.executable, "-m", "benchmark", "fit", *cell.argv, "--run_dir", str(suite.run_dir(cell))]
    if plan.action == "resume" and plan.ckpt is not None:
        command += ["--ckpt_path", str(plan.ckpt)]
    return command


def _move_aside(suite: Suite, cell: Cell) -> list[dict[str, Any]]:
    """Keep a failed / unusable attempt under ``<output>/.attempts/<cell>.<n>``; return its record.

    The whole run directory moves (logs, checkpoints, ``status.json``), so the fresh attempt
    starts from an empty folder and the old one stays readable. ``n`` counts up from 1: earlier
    attempts are never overwritten. The returned attempts, each marked with where it was
    kept, become the start of the new ``suite.json``; ``[]`` when there was no folder.
    """
    run = suite.run_dir(cell)
    if not run.exists():
        return []
    attempts = _read_json(run / RECORD).get("attempts", [])
    keep = suite.output / ".attempts"
    keep.mkdir(parents=True, exist_ok=True)
    n = 1
    while (keep / f"{cell.id}.{n}").exists():
        n += 1
    # A rename: .attempts is inside the output folder, on the run directory's file system, so
    # even a folder of large checkpoints moves at once.
    os.replace(run, keep / f"{cell.id}.{n}")
    for attempt in attempts:
        attempt.setdefault("kept_in", str(keep / f"{cell.id}.{n}"))
    return attempts


# ---------------------------------------------------------------------------- SLURM's view
def submitted_jobs(folder: Path) -> dict[str, str]:
    """The job id each cell was last submitted as (``<output>/.submitit/jobs.json``).

    ``{}`` when the file is missing or malformed: a suite that was never submitted, and a
    status view must not fail because of a damaged record.
    """
    try:
        return {item["cell"]: str(item["job_id"]) for item in json.loads((folder / "jobs.json").read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def queued_on_slurm(jobs: dict[str, str]) -> dict[str, str]:
    """The cells whose job SLURM still holds (pending, running, requeued): ``squeue``; none without it.

    Returns:
        cell id -> ``job <id> <state>`` for the jobs ``squeue`` still lists (``jobs``: cell id
        -> job id, ``<array>_<index>``); ``{}`` off the cluster or when ``squeue`` fails or
        hangs (a minute at most): the cells are then judged by their state on disk alone.
    """
    if not jobs or shutil.which("squeue") is None:
        return {}
    # Ask for the arrays, not each element: one squeue call for the whole suite.
    arrays = sorted({job.split("_")[0] for job in jobs.values()})
    try:
        # -h: no header; -r: one line per array element (else pending elements are folded into
        # one "123_[4-9]" line); "%i %T": the element's job id and its state.
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)], capture_output=True,
                             text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    alive = {line.split()[0]: line.split()[1] for line in out.splitlines() if len(line.split()) >= 2}
    return {cell: f"job {job} {alive[job].lower()}" for cell, job in jobs.items() if job in alive}
