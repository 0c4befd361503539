"""Running one cell as a ``fit`` subprocess (its record, log, signals, time limit) and the progress view.

A cell always runs as its own ``python -m benchmark fit`` process (:class:`CellRun`), never in
the suite's process: a crash, a CUDA error or a leak in one cell cannot take the others down,
and every cell starts from a clean interpreter, exactly as a user's own ``fit`` would. The
suite process only starts fits, forwards signals to them (:class:`_Signals`), enforces the
time limit, records each attempt in the cell's ``suite.json`` and shows the progress
(:class:`Progress`, :func:`status_table`). The serial runner, ``run-cell`` and the submitit
jobs all drive cells through this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from benchmark.app.suites.spec import LOG, RECORD, Cell, Suite, _duration, _plural
from benchmark.app.suites.state import CellState, Plan, _move_aside, _read_json, fit_command
from benchmark.core.errors import EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM
from benchmark.core.io import atomic_write_text
from benchmark.core.io import console as make_console


# ---------------------------------------------------------------------------- running one cell
def _die_with_parent() -> None:
    """Linux: the fit gets SIGTERM (and saves last.ckpt) if the suite process dies.

    Runs in the child between fork and exec (``preexec_fn``); the setting survives the exec.
    Without it a fit whose suite was killed (SIGKILL, an out-of-memory kill) would train on
    unsupervised, in its own session where no terminal signal reaches it. Best effort: a libc
    without ``prctl`` (not glibc) leaves the fit as it is.
    """
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class CellRun:
    """One attempt of a cell: a ``fit`` subprocess in its own process group, output to ``fit.log``.

    The caller drives it: :meth:`start`, then :meth:`poll` (and :meth:`check_time_limit`)
    until the fit ends, then :meth:`finish`, which records the exit code. The attempt is
    written to ``suite.json`` twice: when it starts (so that a suite killed meanwhile leaves a
    trace) and when it ends.

    Attributes:
        run_dir: the cell's run directory.
        proc: the fit's process, once started.
        signals: the signals forwarded to the fit so far (the time limit's SIGTERM included).
        reason: why the attempt ended, as recorded: the first forwarded signal's reason, else
            the fit's last error line from its log.
        attempts: every attempt recorded in ``suite.json``, this one last.
    """

    def __init__(self, suite: Suite, cell: Cell, plan: Plan) -> None:
        """Prepare an attempt of ``cell`` as ``plan`` says (``run``, ``resume``, ``retry``, ``restart``)."""
        self.suite, self.cell, self.plan = suite, cell, plan
        self.run_dir = suite.run_dir(cell)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.signals: list[int] = []
        self.reason = ""
        self.attempts: list[dict[str, Any]] = []

    def start(self) -> None:
        """Start the fit: set the folder up, record the attempt, and launch the subprocess.

        A ``retry`` / ``restart``, and a ``run`` whose folder already holds a run (``fit`` refuses
        to start a second run in a folder with a ``config.yaml``), move the old folder aside first
        (:func:`.state._move_aside`); a ``resume`` keeps the folder and the attempts recorded so far.
        """
        if self.plan.action in ("retry", "restart") or (
            self.plan.action == "run" and (self.run_dir / "config.yaml").exists()
        ):
            self.attempts = _move_aside(self.suite, self.cell)
        else:
            self.attempts = _read_json(self.run_dir / RECORD).get("attempts", [])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.command = fit_command(self.suite, self.cell, self.plan)
        # Appended: fit.log keeps every attempt of the cell, each under its own header line.
        self.log = open(self.run_dir / LOG, "a")  # noqa: SIM115 - closed in finish()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.log.write(f"\n===== suite {self.suite.name}: {self.cell.id} ({self.plan.action}) {stamp}\n"
                       f"$ {shlex.join(self.command)}\n")
        self.log.flush()
        # Recorded before the fit starts: if the fit dies before writing its status.json (an
        # import error, a signal), this attempt is what cell_state reads.
        self._record(None)
        # Unbuffered, so the log (and the progress view's last line) follows the fit as it runs;
        # COLUMNS, because rich writing into a file assumes 80 columns and cuts tables short.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": os.environ.get("COLUMNS", "160")}
        env.setdefault("WANDB_RUN_GROUP", self.cell.group(self.suite.name))  # the W&B logger groups by it
        # Recorded by the run (metrics JSON, W&B config): the report filters a suite's runs by them.
        env.update(DML_BENCHMARK_SUITE=self.suite.name, DML_BENCHMARK_CELL=self.cell.id,
                   DML_BENCHMARK_VARIANT=self.cell.variant or "")  # fmt: skip
        self.started = time.monotonic()
        # A new session (and process group): a Ctrl-C at the terminal goes to the foreground
        # group only, i.e. to the suite, which decides what the fit gets (_Signals) instead of
        # the fit and its DDP workers each getting it directly; killpg then reaches the whole
        # group. No stdin: a fit must never wait for input nobody can give.
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            self.command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    @property
    def elapsed(self) -> float:
        """Seconds since the fit started (monotonic clock); 0 before :meth:`start`."""
        return time.monotonic() - self.started if self.started else 0.0

    def poll(self) -> int | None:
        """The fit's exit code once it has ended, else None (also before :meth:`start`)."""
        return self.proc.poll() if self.proc is not None else None

    def send(self, signum: int, reason: str = "") -> None:
        """Forward a signal to the fit's process group (its DDP workers included).

        Args:
            signum: the signal, e.g. ``signal.SIGTERM``.
            reason: recorded as the attempt's reason unless an earlier signal gave one.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signals.append(signum)
        self.reason = self.reason or reason
        # The fit may end between the poll above and here: a group that is gone is not an error.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def check_time_limit(self) -> None:
        """SIGTERM the fit once it has run longer than ``resources.time`` (call it while polling).

        The fit stops after its current step and saves ``last.ckpt``, so the cell ends interrupted
        and the next ``suite run`` resumes it, as a cluster's time limit would. Sent once: a fit
        that already received a signal is left to finish saving.
        """
        limit = self.cell.resources.time
        if limit and self.elapsed > limit * 60 and not self.signals:
            self.send(signal.SIGTERM, f"time limit ({_duration(limit * 60)}) reached")

    def finish(self) -> int:
        """Wait for the fit to end, close its log and record the attempt's exit code and reason.

        Returns:
            The fit's exit code; a fit killed by a signal it did not handle gets 128 + the signal
            number, as a shell reports it (``Popen`` gives ``-signum``).
        """
        code = self.proc.wait() if self.proc is not None else EXIT_FAILED
        if code < 0:  # killed by a signal the fit did not handle
            code = 128 - code
        if code not in (0, EXIT_SIGINT, EXIT_SIGTERM) and not self.reason:
            # The reason shown for a failure: the fit's last "error: ..." line (how the CLI reports
            # a user error) or "Error..." line; after a traceback, whose header says nothing, the
            # last line of output, i.e. the exception itself.
            errors = [line for line in self.log_tail(40) if line.startswith(("error:", "Error", "Traceback"))]
            last = self.log_tail(1)
            self.reason = (errors[-1] if errors and not errors[-1].startswith("Traceback") else last[0] if last else "")[:300]
        self.log.write(f"===== exit {code} after {_duration(self.elapsed)}\n")
        self.log.close()
        self._record(code)
        return code

    def _record(self, code: int | None) -> None:
        """Write ``suite.json``: a new attempt when ``code`` is None, else this attempt's end.

        The record also holds the cell's ``argv``: what :func:`.state.argv_changes` compares the
        suite file with on the next run. Written atomically, as other processes read it at any time.
        """
        attempt = {"action": self.plan.action, "command": self.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "host": socket.gethostname()}
        if code is None:
            self.attempts.append(attempt)
        else:  # the attempt appended by start(), completed with how it ended
            self.attempts[-1].update(exit_code=code, seconds=round(self.elapsed, 1), reason=self.reason)
        payload = {"suite": str(self.suite.path), "cell": self.cell.id, "argv": self.cell.argv, "attempts": self.attempts}
        atomic_write_text(self.run_dir / RECORD, json.dumps(payload, indent=2) + "\n")

    def log_tail(self, lines: int = 1) -> list[str]:
        """The last ``lines`` non-empty lines of ``fit.log``, without colour codes or the suite's own
        header lines; ``[]`` when the log cannot be read.

        Only the last 16 KiB are read, so the progress view can call it twice a second on a log of
        any size. Carriage returns count as line ends: progress bars rewrite one line with them.
        """
        try:
            with open(self.run_dir / LOG, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
        parts = [p.strip() for p in re.split(r"[\r\n]", text) if p.strip() and not p.startswith("=====")]
        return parts[-lines:]


class _Signals:
    """SIGINT / SIGTERM while cells run: forward to the running fit (it stops after its step and
    saves last.ckpt), start no further cell, exit 130 / 143. A second Ctrl-C is forwarded too
    (the fit then aborts at once).

    A context manager: the previous handlers come back on exit. ``running`` is the list of
    attempts the caller keeps current; ``received`` the first signal, if any.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.running: list[CellRun] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        # Python installs handlers only from the main thread; elsewhere (e.g. a test running the
        # suite in a thread) the cells run with the default handling.
        with contextlib.suppress(ValueError):  # not the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(ValueError):
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        """Remember the first signal, say once what happens now, and forward every signal to the fits.

        The fits run in their own sessions (:meth:`CellRun.start`), so this forwarding is the only
        way a Ctrl-C reaches them: the first one makes a fit stop after its step and save, a second
        one makes it abort.
        """
        if self.received is None:
            self.received = signum
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"\n[suite] {name}: stopping the running cell (it saves last.ckpt and resumes on the next run); "
                  "no further cell starts.", file=sys.stderr, flush=True)
        for run in self.running:
            run.send(signum, "stopped by " + ("SIGINT" if signum == signal.SIGINT else "SIGTERM"))

    @property
    def exit_code(self) -> int | None:
        """130 after SIGINT, 143 after SIGTERM (the shell's 128 + signal), None without a signal."""
        if self.received is None:
            return None
        return EXIT_SIGINT if self.received == signal.SIGINT else EXIT_SIGTERM




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
        self.running: list[CellRun] = []
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

    def started(self, run: CellRun) -> None:
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

    def finished(self, run: CellRun, code: int, state: CellState) -> None:
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
