"""The commands that take one cell or only read: ``run-cell``, ``--dry-run``, ``status``.

Each function here takes a loaded, validated suite and the selected cells, reads every cell's
state from disk (:mod:`.state`), decides per cell what to do (:func:`.state.plan_cell`) and
either shows it (``--dry-run``, ``status``) or runs its one cell (``run-cell``, :mod:`.runner`). The
exit codes follow ``fit``'s: 0 when every selected cell is completed, 1 when one is not, 130 /
143 when a signal stopped the run. ``run-cell``, the unit a W&B agent or a submitit job runs,
also waits for the cells it needs (:func:`wait_for_needs`).
"""

from __future__ import annotations

import json
import shlex
import socket
import sys
import time

from benchmark.app.suites.fields import SuiteError, _Problems
from benchmark.app.suites.runner import CellRun, log_tail, run_attempt
from benchmark.app.suites.spec import (
    EXIT_OK,
    LOG,
    RECORD,
    Cell,
    Suite,
    _duration,
    _plural,
    matches,
    parse_selector,
)
from benchmark.app.suites.state import (
    STARTS,
    Plan,
    _read_json,
    cell_state,
    fit_command,
    plan_cell,
    queued_on_slurm,
    refuse_changed,
    submitted_jobs,
)
from benchmark.app.suites.views import _counts, changed_lines, status_table
from benchmark.core.defaults import recipe_dir
from benchmark.core.errors import EXIT_FAILED, EXIT_SIGINT
from benchmark.core.io import atomic_write_text
from benchmark.core.io import console as make_console


# ---------------------------------------------------------------------------- commands
def _selected(suite: Suite, only: list[str]) -> list[Cell]:
    """The cells ``--only`` selects (a cell matching any of the selectors), in the suite's order.

    Raises:
        SuiteError: a malformed selector, or selectors that match no cell (a typo would
            otherwise run nothing and report success).
    """
    if not only:
        return list(suite.cells)
    problems = _Problems(suite.path)
    selectors = [s for s in (parse_selector(text, "--only", problems) for text in only) if s is not None]
    problems.raise_if_any()
    chosen = [c for c in suite.cells if any(matches(c, s) for s in selectors)]
    if not chosen:
        raise SuiteError(f"--only {' '.join(only)} matches no cell of {suite.path}. `suite status` lists them.")
    return chosen


WAIT_NEEDS_MINUTES = 24 * 60  # run-cell: how long a cell waits for the cells it needs (--wait-needs)
WAITABLE = ("pending", "running")  # states of a needed cell that may still complete without anyone's action


def record_blocked(suite: Suite, cell: Cell, reason: str) -> None:
    """Note in the cell's ``suite.json`` that it was not started, and why (``suite status`` shows the
    cell as blocked). The arguments are not recorded: the cell has not run with any.

    Earlier attempts and arguments already in the record are kept; the file is written
    atomically, since other agents may read it at the same time.
    """
    run = suite.run_dir(cell)
    record = _read_json(run / RECORD)
    payload = {"suite": str(suite.path), "cell": cell.id, **({"argv": record["argv"]} if record.get("argv") else {}),
               "attempts": record.get("attempts", []),
               "blocked": {"reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname()}}
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / RECORD, json.dumps(payload, indent=2) + "\n")


def wait_for_needs(suite: Suite, cell: Cell, retry_failed: bool, restart_changed: bool,
                   wait_s: float) -> Plan | int:
    """``run-cell`` of a cell whose needs have not completed (W&B agents run the cells of a sweep
    at once): wait while every unfinished need is pending or running, polling their states, at
    most ``wait_s`` seconds. Returns the cell's plan once its needs have completed, or an exit code:

    * 0 when a need cannot complete by itself (failed, interrupted, blocked): the cell is not
      started and is recorded as blocked with the reason. Not an error of this cell (the need's
      own run carries the failure), and a W&B agent counts every non-zero exit as a failed run and
      stops after a few quick ones, which would end the sweep on that machine;
    * 1 when the wait runs out (recorded as blocked too): something is holding the sweep up;
    * 130 on Ctrl-C.

    Args:
        suite: the loaded suite.
        cell: the cell to run once its needs have completed.
        retry_failed, restart_changed: as for :func:`.state.plan_cell`.
        wait_s: the longest wait in seconds (``--wait-needs``); 0 decides at once.
    """
    deadline = time.monotonic() + wait_s  # monotonic: a clock change must not end or extend the wait
    poll = min(30.0, max(1.0, wait_s / 60))  # 24 h: every 30 s; a minute: every second
    said = ""  # the last "waiting for" line printed: printed again only when it changes
    try:
        while True:
            # Planned again on every poll: the cell's own state may change too (another process
            # sharing the folder may have run it meanwhile, which makes the plan a skip).
            plan = plan_cell(suite, cell, retry_failed, restart_changed=restart_changed)
            if plan.action != "blocked":
                return plan
            unfinished = {n: cell_state(suite, suite.cell(n)) for n in cell.needs}
            unfinished = {n: s for n, s in unfinished.items() if s.state != "completed"}
            if not unfinished:
                continue  # completed between the two reads
            # A need that is failed, interrupted or blocked will not complete while we wait: only
            # a person (or a `suite run`) can change that, so do not hold an agent for hours.
            stuck = {n: s for n, s in unfinished.items() if s.state not in WAITABLE}
            if stuck:
                reason = "; ".join(f"needs {n}, which is {s.state}" + (f" ({s.reason})" if s.reason else "")
                                   for n, s in stuck.items())
                record_blocked(suite, cell, reason)
                print(f"[suite] {cell.id}: skipped, not started: {reason}. Recorded as blocked in "
                      f"{suite.run_dir(cell) / RECORD} (exit 0: not a failure of this cell). Once the cell it needs "
                      f"has completed (`python -m benchmark suite run {suite.path} --retry-failed` retries failed cells "
                      "and resumes interrupted ones), run this cell again.", file=sys.stderr, flush=True)
                return EXIT_OK
            waiting = ", ".join(f"{n} ({s.state}{' ' + s.reason if s.reason else ''})" for n, s in unfinished.items())
            left = deadline - time.monotonic()
            if left <= 0:
                reason = f"waited {_duration(wait_s)} for {waiting}"
                record_blocked(suite, cell, reason)
                print(f"[suite] {cell.id}: not started: {reason}, which did not complete. Start the cells it needs "
                      f"(`python -m benchmark suite run {suite.path}`), or wait longer with --wait-needs.",
                      file=sys.stderr, flush=True)
                return EXIT_FAILED
            if waiting != said:  # one line per change, not one per poll, in an agent's log
                print(f"[suite] {cell.id}: waiting for the cells it needs: {waiting}; up to {_duration(left)} more, "
                      f"checking every {poll:g} s (--wait-needs sets the limit).", flush=True)
                said = waiting
            time.sleep(min(poll, left))
    except KeyboardInterrupt:  # no fit runs yet, so Python's default Ctrl-C handling applies
        print(f"\n[suite] {cell.id}: Ctrl-C while waiting for the cells it needs; not started.", file=sys.stderr)
        return EXIT_SIGINT


def run_one(suite: Suite, cell: Cell, retry_failed: bool, quiet: bool = False, restart_changed: bool = False,
            wait_needs_s: float = WAIT_NEEDS_MINUTES * 60) -> int:
    """``suite run-cell``: one cell with the suite's rules; the fit's exit code (see
    :func:`wait_for_needs` for a cell whose needs have not completed).

    A completed cell is skipped (0); a failed one not retried, or one running elsewhere, is
    not started (1); an interrupted one resumes from ``last.ckpt``. Unlike ``suite run`` (:func:`.launchers.run_here`)
    it shows no live view, and ``run-cell`` takes no lock: several agents run cells of one
    folder at once, and their output goes to logs.

    Args:
        suite: the loaded suite.
        cell: the cell to run.
        retry_failed, restart_changed: ``--retry-failed``, ``--restart-changed``.
        quiet: leave out the line that shows the fit's command and log before it starts.
        wait_needs_s: how long to wait for the cells it needs, in seconds (``--wait-needs``).

    Raises:
        SuiteError: the cell is interrupted but its options changed
            (:func:`.state.refuse_changed`).
    """
    plan = plan_cell(suite, cell, retry_failed, restart_changed=restart_changed)
    if plan.action == "blocked":
        waited = wait_for_needs(suite, cell, retry_failed, restart_changed, wait_needs_s)
        if isinstance(waited, int):
            return waited
        plan = waited
    refuse_changed(suite, {cell.id: plan})  # after the wait: the plan a need's completion produced
    if plan.action == "skip":
        print(f"[suite] {cell.id}: {plan.note}; nothing to do.", flush=True)
        return EXIT_OK
    # Exit 1 for these: the agent's run fails visibly, unlike a blocked skip (see wait_for_needs).
    if plan.action in ("report", "wait"):
        print(f"[suite] {cell.id}: not started: {plan.note}"
              + (" (--retry-failed starts it again)" if plan.action == "report" else ""), file=sys.stderr, flush=True)
        return EXIT_FAILED
    run = CellRun(suite, cell, plan)
    if not quiet:
        print(f"[suite] {cell.id}: {plan.action}; log {run.run_dir / LOG}\n$ {shlex.join(fit_command(suite, cell, plan))}",
              flush=True)
    # This process is the cell's job (a W&B agent's, or one a user starts): it relays a signal it
    # gets to the fit, which stops after its step and saves last.ckpt.
    code = run_attempt(run)
    state = cell_state(suite, cell)
    print(f"[suite] {cell.id}: {state.state} (exit {code}) after {_duration(run.elapsed)}"
          + (f", test R@1 {state.r_at_1}" if state.r_at_1 else ""), flush=True)
    if state.state == "failed":
        for line in log_tail(run.run_dir, 12):
            print(f"    | {line}", file=sys.stderr, flush=True)
    return code


def dry_run(suite: Suite, cells: list[Cell], retry_failed: bool, restart_changed: bool = False) -> int:
    """List the cells, their states, what a run would do (and why) and their exact ``fit`` commands.

    Starts nothing and writes nothing (no lock, no output folder), so it is safe beside a
    running suite. Per cell: its state (``changed`` when the file's options differ from those
    it ran with), the planned action and its reason, the recipe that applies when the cell
    gives none, the cells it needs, the paper rows it reproduces and the ``fit`` command a
    run would use (with ``--ckpt_path`` when it resumes).

    Returns:
        0: a dry run judges nothing; the states and notes say what needs attention.
    """
    # Every cell's state, not only the selected ones': a selected cell's plan reads its needs' states.
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    print(f"suite {suite.name} ({suite.path}): {len(cells)} cells, output {suite.output}")
    for i, cell in enumerate(cells, 1):
        plan = plan_cell(suite, cell, retry_failed, states, restart_changed)
        # The plan as a user reads it: report, wait and refuse are all "not started"; a blocked
        # cell runs once the cells it needs have completed, later in the same run.
        label = {"skip": "skip", "run": "run", "resume": "resume", "retry": "retry", "restart": "restart",
                 "report": "not started", "wait": "not started", "refuse": "not started",
                 "blocked": "after its dependencies"}[plan.action]
        note = f" ({plan.note})" if plan.note else ""
        shown = states[cell.id].state + (", changed" if states[cell.id].changed else "")
        print(f"[{i}/{len(cells)}] {cell.id}: {shown} -> {label}{note}")
        # The recipe fit applies on its own; a cell with its own --config / --recipe says which itself.
        if "config" not in cell.options and "recipe" not in cell.options:
            recipe = recipe_dir() / cell.method / f"{cell.dataset}.yaml"
            print(f"    recipe: {recipe if recipe.is_file() else 'none (the constructors defaults apply)'}")
        if cell.needs:
            print(f"    needs: {', '.join(cell.needs)}")
        for table, row in cell.reproduces:
            print(f"    reproduces: {suite.paper} {table}, {row}")
        # A cell that would not start now still shows the command it would run with.
        command_plan = plan if plan.action in STARTS else Plan("run", plan.state)
        print(f"    {shlex.join(fit_command(suite, cell, command_plan))}")
    for line in changed_lines(suite, cells, states):
        print(line)
    return EXIT_OK


def show_status(suite: Suite, cells: list[Cell]) -> int:
    """``suite status``: the table of cells (with SLURM's view of submitted ones) and what changed.

    A cell that was submitted to SLURM but has not started (or whose job ended) shows its job:
    ``job <id> pending`` while SLURM still holds it, ``submitted as job <id>`` otherwise, so
    that a queued cell is not mistaken for a forgotten one.

    Returns:
        0: the view reports states, it does not judge them.
    """
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    # SLURM's view is added to the note only: a cell's state is still what its folder says.
    jobs = submitted_jobs(suite.output / ".submitit")
    queued = queued_on_slurm(jobs)
    for cell_id, job in jobs.items():
        state = states.get(cell_id)
        if state is not None and state.state not in ("completed", "running"):
            state.reason = (f"{queued[cell_id]}" if cell_id in queued else f"submitted as job {job}") + (
                f"; {state.reason}" if state.reason else "")
    console = make_console()
    console.print(status_table(suite, cells, states))
    console.print(f"{_plural(len(cells), 'cell')}: {_counts(states[c.id] for c in cells)}", highlight=False)
    for line in changed_lines(suite, cells, states):
        console.print(line, highlight=False, markup=False)
    return EXIT_OK
