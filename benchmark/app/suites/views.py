"""What the suite process shows while and after cells run: the progress view, the status table, the summary.

The cells run in submitit jobs (:mod:`.launchers`); the suite process watches them
(:class:`Watched`: a job, its cell and the cell's ``fit.log``) and shows the progress
(:class:`Progress`), the table of states (:func:`status_table`) and the summary that closes a
run with the command that deals with each kind of cell left over (:func:`_summary`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.app.suites.runner import log_tail
from benchmark.app.suites.spec import LOG, RECORD, Cell, Suite, _duration, _plural
from benchmark.app.suites.state import CellState, Plan
from benchmark.core.io import console as make_console


@dataclass
class Watched:
    """A cell whose job has been started, as the suite process sees it.

    Attributes:
        cell: the cell.
        plan: how its job was asked to start it.
        run_dir: the cell's run directory (its ``fit.log``).
        job: the submitit job running it.
        started: when the job was submitted (monotonic clock).
        relayed: the signals the suite has relayed to the job so far.
    """

    cell: Cell
    plan: Plan
    run_dir: Path
    job: Any = None
    started: float = field(default_factory=time.monotonic)
    relayed: list[int] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        """Seconds since the job was submitted."""
        return time.monotonic() - self.started

    def log_tail(self, lines: int = 1) -> list[str]:
        """The last ``lines`` lines of the cell's ``fit.log`` (:func:`.runner.log_tail`)."""
        return log_tail(self.run_dir, lines)


class Progress:
    """Cells finished / running / failed, elapsed and ETA: a live view on a terminal, lines otherwise.

    On a terminal a ``rich`` live view is redrawn in place (the running cells with their last
    log line, the last failures); in a pipe or a log file, where a redrawn view would be
    garbage, every event is one ``[suite] ...`` line instead.

    Args:
        suite: the suite, for the headline.
        todo: the number of cells this run will attempt (the denominator of ``n/todo``).
        live: force the live view on or off; default: on when stdout is a terminal.
    """

    def __init__(self, suite: Suite, todo: int, live: bool | None = None) -> None:
        self.suite, self.todo = suite, todo
        self.counts = {"completed": 0, "failed": 0, "interrupted": 0, "not started": 0}
        self.durations: list[float] = []  # of the cells that ran to their end: the ETA's sample
        self.start = time.monotonic()
        self.running: list[Watched] = []
        self.failures: list[str] = []
        self.live_view = None
        if live if live is not None else sys.stdout.isatty():
            from rich.live import Live  # only for the live view

            self.live_view = Live(self._render(), console=make_console(), refresh_per_second=2, transient=False)
            self.live_view.start()

    @property
    def finished_count(self) -> int:
        """Cells done with in this run, whatever their outcome."""
        return sum(self.counts.values())

    def eta(self) -> str:
        """Time left: the cells left times the mean time of the cells finished so far, less the
        time the running ones have already spent (each counted up to that mean).

        ``"?"`` before any cell has finished, ``""`` when none is left. Cells of one suite differ
        (methods, datasets), so this is a rough guide that improves as cells finish.
        """
        left = self.todo - self.finished_count
        if left <= 0:
            return ""
        if not self.durations:
            return "?"
        mean = sum(self.durations) / len(self.durations)
        running = sum(min(r.elapsed, mean) for r in self.running)
        return _duration(max(0.0, left * mean - running))

    def headline(self) -> str:
        """``3/8 finished (2 completed, 1 failed) · 1 running · elapsed 1:02:03 · ETA 2:10:00``."""
        eta = self.eta()
        counts = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
        return (f"{self.finished_count}/{self.todo} finished{' (' + counts + ')' if counts else ''} · "
                f"{len(self.running)} running · elapsed {_duration(time.monotonic() - self.start)}"
                + (f" · ETA {eta}" if eta else ""))

    def _render(self):
        """The live view: the headline, each running cell with its time and last log line, the last
        five failures."""
        from rich.markup import escape
        from rich.table import Table

        # Log lines and reasons are escaped: a fit's output may hold "[...]" that rich would
        # read as markup.
        table = Table.grid(padding=(0, 1))
        table.add_row(f"[bold]suite {self.suite.name}[/bold]: {self.headline()}")
        for run in self.running:
            tail = run.log_tail(1)
            table.add_row(f"  [cyan]▶ {run.cell.id}[/cyan] {_duration(run.elapsed)}  [dim]{escape(tail[0][:120]) if tail else ''}[/dim]")
        for line in self.failures[-5:]:
            table.add_row(f"  [red]✗ {escape(line)}[/red]")
        return table

    def say(self, line: str) -> None:
        """Print one event line; with the live view, above it (the view is redrawn below)."""
        if self.live_view is None:
            print(f"[suite] {line}", flush=True)
        else:
            self.live_view.console.print(line, highlight=False, markup=False)

    def started(self, run: Watched) -> None:
        """A cell's fit has started (printed as a line without the live view, which shows it anyway)."""
        self.running.append(run)
        if self.live_view is None:
            self.say(f"{self.finished_count + 1}/{self.todo} {run.cell.id}: {run.plan.action}"
                     f"{' (' + run.plan.note + ')' if run.plan.note else ''}; log {run.run_dir / LOG}")
        self.refresh()

    def not_started(self, cell: Cell, note: str) -> None:
        """A cell that was to run was not started (its plan changed, e.g. a cell it needs failed)."""
        self.counts["not started"] += 1
        self.failures.append(f"{cell.id}: not started, {note}")
        self.say(f"{cell.id}: not started ({note})")
        self.refresh()

    def finished(self, run: Watched, code: int, state: CellState) -> None:
        """A cell's fit has ended with ``code``; ``state`` is its state read afterwards.

        A failed cell's last log lines are printed at once, so the reason is visible without opening
        ``fit.log``. Only completed and failed cells count for the ETA: an interrupted one ran for
        part of its time.
        """
        self.running.remove(run)
        # A fit that ended without leaving a state the counts know (e.g. no status.json) counts as failed.
        self.counts[state.state if state.state in self.counts else "failed"] += 1
        if state.state in ("completed", "failed"):
            self.durations.append(run.elapsed)
        if state.state == "completed":
            self.say(f"{run.cell.id}: completed in {_duration(run.elapsed)}"
                     + (f", test R@1 {state.r_at_1}" if state.r_at_1 else "") + f" — {self.headline()}")
        else:
            self.failures.append(f"{run.cell.id}: {state.state}, exit {code} ({state.reason or 'see ' + str(run.run_dir / LOG)})")
            self.say(f"{run.cell.id}: {state.state} (exit {code}) after {_duration(run.elapsed)}: {state.reason} — "
                     f"{self.headline()}")
            if state.state == "failed":
                for line in run.log_tail(12):
                    self.say(f"    | {line}")
        self.refresh()

    def refresh(self) -> None:
        """Redraw the live view (a no-op without it); called while the fit runs, for the times."""
        if self.live_view is not None:
            self.live_view.update(self._render())

    def close(self) -> None:
        """Draw the final view and stop the live display, leaving it on the screen."""
        if self.live_view is not None:
            self.live_view.update(self._render())
            self.live_view.stop()


def status_table(suite: Suite, cells: list[Cell], states: dict[str, CellState], plans: dict[str, Plan] | None = None):
    """The cells as a table: state (``(changed)`` when the file's options differ from those the
    cell ran with), exit code, attempts, time, test R@1 and a note.

    Args:
        suite: the suite (title: its name and output folder).
        cells: the rows, in this order.
        states: every cell's state, by id.
        plans: when given (after a run), the note of a cell that was not started says why
            (blocked, failed and not retried, refused) instead of its last reason.

    Returns:
        A ``rich`` table; notes are cut to 100 characters (:func:`changed_lines` gives the
        changes in full).
    """
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"suite {suite.name} ({suite.output})")
    for column in ("cell", "state", "exit", "tries", "time", "test R@1 %", "note"):
        table.add_column(column, justify="right" if column in ("exit", "tries", "time") else "left")
    colours = {"completed": "green", "failed": "red", "interrupted": "yellow", "running": "cyan", "pending": "dim",
               "blocked": "magenta"}
    for cell in cells:
        state = states[cell.id]
        note = state.reason
        if plans and cell.id in plans and plans[cell.id].action in ("blocked", "report", "refuse"):
            note = plans[cell.id].note
        # What the next `suite run` does with the cell, where it is not obvious from its state.
        if state.state == "interrupted" and state.checkpoint is not None and not state.changed:
            note = f"{note}; resumes from last.ckpt".strip("; ")
        if state.changed and "options changed" not in note:
            note = f"options changed: {'; '.join(state.changes)}; {note}".strip("; ")
        # "(changed)" beside the state, in any state: a completed cell's results are then the
        # old options'.
        shown = f"[{colours.get(state.state, 'white')}]{state.state}[/]" + (" [magenta](changed)[/]" if state.changed else "")
        table.add_row(cell.id, shown, "" if state.exit_code is None else str(state.exit_code), str(state.attempts or ""),
                      _duration(state.seconds), state.r_at_1, escape(note[:100]))
    return table


def changed_lines(suite: Suite, cells: list[Cell], states: dict[str, CellState]) -> list[str]:
    """Every cell whose options changed since it ran, with what changed in full (the table's note
    is cut short), and what to do about it; no lines when none changed.

    Shown by ``suite status``, ``--dry-run`` and ``suite run``'s summary: a changed cell's
    results (or its refusal to resume) would otherwise look unexplained.
    """
    changed = [c for c in cells if states[c.id].changed]
    if not changed:
        return []
    lines = [f"changed since they ran ({RECORD}'s arguments -> the suite file's now):"]
    lines += [f"  {c.id} ({states[c.id].state}): {'; '.join(states[c.id].changes)}" for c in changed]
    lines.append(f"completed cells keep the results of their old options and interrupted ones are not resumed: "
                 f"`python -m benchmark suite run {suite.path} --restart-changed` starts them again from scratch "
                 f"(the old attempts are kept under {suite.output / '.attempts'}).")
    return lines


def _counts(states: Iterable[CellState]) -> str:
    """``3 completed, 1 failed, 2 pending (1 changed)``: the states counted, in a fixed order."""
    counts: dict[str, int] = {}
    changed = 0
    for state in states:
        counts[state.state] = counts.get(state.state, 0) + 1
        changed += state.changed
    order = ("completed", "running", "interrupted", "failed", "blocked", "pending")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) + (f" ({changed} changed)" if changed else "")


def _summary(suite: Suite, cells: list[Cell], states: dict[str, CellState], plans: dict[str, Plan]) -> None:
    """The table that closes every run, the counts, and the command that deals with each kind of
    cell left over (failed: ``--retry-failed``; interrupted: run again; changed:
    ``--restart-changed``), then where to read the results over the seeds."""
    console = make_console()
    console.print(status_table(suite, cells, states, plans))
    console.print(f"{_plural(len(cells), 'cell')}: {_counts(states[c.id] for c in cells)}", highlight=False)
    failed = [c for c in cells if states[c.id].state == "failed"]
    if failed:
        console.print(f"failed cells keep their folder and log ({LOG}); start them again with "
                      f"`python -m benchmark suite run {suite.path} --retry-failed`.", highlight=False)
    if any(states[c.id].state == "interrupted" and not states[c.id].changed for c in cells):
        console.print(f"interrupted cells resume from last.ckpt with `python -m benchmark suite run {suite.path}`.",
                      highlight=False)
    for line in changed_lines(suite, cells, states):
        console.print(line, highlight=False, markup=False)
    if any(states[c.id].state == "completed" for c in cells):
        console.print(f"results over the seeds: `python -m benchmark leaderboard --runs {suite.output}`", highlight=False)
