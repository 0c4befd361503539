"""Running one cell as a ``fit`` subprocess (its record, log, signals, time limit) and the progress view."""

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
    """Linux: the fit gets SIGTERM (and saves last.ckpt) if the suite process dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class CellRun:
    """One attempt of a cell: a ``fit`` subprocess in its own process group, output to ``fit.log``."""

    def __init__(self, suite: Suite, cell: Cell, plan: Plan) -> None:
        self.suite, self.cell, self.plan = suite, cell, plan
        self.run_dir = suite.run_dir(cell)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.signals: list[int] = []
        self.reason = ""
        self.attempts: list[dict[str, Any]] = []

    def start(self) -> None:
        if self.plan.action in ("retry", "restart") or (
            self.plan.action == "run" and (self.run_dir / "config.yaml").exists()
        ):
            self.attempts = _move_aside(self.suite, self.cell)
        else:
            self.attempts = _read_json(self.run_dir / RECORD).get("attempts", [])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.command = fit_command(self.suite, self.cell, self.plan)
        self.log = open(self.run_dir / LOG, "a")  # noqa: SIM115 - closed in finish()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.log.write(f"\n===== suite {self.suite.name}: {self.cell.id} ({self.plan.action}) {stamp}\n"
                       f"$ {shlex.join(self.command)}\n")
        self.log.flush()
        self._record(None)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": os.environ.get("COLUMNS", "160")}
        env.setdefault("WANDB_RUN_GROUP", self.cell.group(self.suite.name))  # the W&B logger groups by it
        # Recorded by the run (metrics JSON, W&B config): the report filters a suite's runs by them.
        env.update(DML_BENCHMARK_SUITE=self.suite.name, DML_BENCHMARK_CELL=self.cell.id,
                   DML_BENCHMARK_VARIANT=self.cell.variant or "")  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            self.command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def send(self, signum: int, reason: str = "") -> None:
        """Forward a signal to the fit's process group (its DDP workers included)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signals.append(signum)
        self.reason = self.reason or reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def check_time_limit(self) -> None:
        limit = self.cell.resources.time
        if limit and self.elapsed > limit * 60 and not self.signals:
            self.send(signal.SIGTERM, f"time limit ({_duration(limit * 60)}) reached")

    def finish(self) -> int:
        code = self.proc.wait() if self.proc is not None else EXIT_FAILED
        if code < 0:  # killed by a signal the fit did not handle
            code = 128 - code
        if code not in (0, EXIT_SIGINT, EXIT_SIGTERM) and not self.reason:
            errors = [line for line in self.log_tail(40) if line.startswith(("error:", "Error", "Traceback"))]
            last = self.log_tail(1)
            self.reason = (errors[-1] if errors and not errors[-1].startswith("Traceback") else last[0] if last else "")[:300]
        self.log.write(f"===== exit {code} after {_duration(self.elapsed)}\n")
        self.log.close()
        self._record(code)
        return code

    def _record(self, code: int | None) -> None:
        attempt = {"action": self.plan.action, "command": self.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "host": socket.gethostname()}
        if code is None:
            self.attempts.append(attempt)
        else:
            self.attempts[-1].update(exit_code=code, seconds=round(self.elapsed, 1), reason=self.reason)
        payload = {"suite": str(self.suite.path), "cell": self.cell.id, "argv": self.cell.argv, "attempts": self.attempts}
        atomic_write_text(self.run_dir / RECORD, json.dumps(payload, indent=2) + "\n")

    def log_tail(self, lines: int = 1) -> list[str]:
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
    (the fit then aborts at once)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.running: list[CellRun] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        with contextlib.suppress(ValueError):  # not the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(ValueError):
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"\n[suite] {name}: stopping the running cell (it saves last.ckpt and resumes on the next run); "
                  "no further cell starts.", file=sys.stderr, flush=True)
        for run in self.running:
            run.send(signum, "stopped by " + ("SIGINT" if signum == signal.SIGINT else "SIGTERM"))

    @property
    def exit_code(self) -> int | None:
        if self.received is None:
            return None
        return EXIT_SIGINT if self.received == signal.SIGINT else EXIT_SIGTERM




class Progress:
    """Cells finished / running / failed, elapsed and ETA: a live view on a terminal, lines otherwise."""

    def __init__(self, suite: Suite, todo: int, live: bool | None = None) -> None:
        self.suite, self.todo = suite, todo
        self.counts = {"completed": 0, "failed": 0, "interrupted": 0, "not started": 0}
        self.durations: list[float] = []
        self.start = time.monotonic()
        self.running: list[CellRun] = []
        self.failures: list[str] = []
        self.live_view = None
        if live if live is not None else sys.stdout.isatty():
            from rich.live import Live

            self.live_view = Live(self._render(), console=make_console(), refresh_per_second=2, transient=False)
            self.live_view.start()

    @property
    def finished_count(self) -> int:
        return sum(self.counts.values())

    def eta(self) -> str:
        left = self.todo - self.finished_count
        if left <= 0:
            return ""
        if not self.durations:
            return "?"
        mean = sum(self.durations) / len(self.durations)
        running = sum(min(r.elapsed, mean) for r in self.running)
        return _duration(max(0.0, left * mean - running))

    def headline(self) -> str:
        eta = self.eta()
        counts = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
        return (f"{self.finished_count}/{self.todo} finished{' (' + counts + ')' if counts else ''} · "
                f"{len(self.running)} running · elapsed {_duration(time.monotonic() - self.start)}"
                + (f" · ETA {eta}" if eta else ""))

    def _render(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table.grid(padding=(0, 1))
        table.add_row(f"[bold]suite {self.suite.name}[/bold]: {self.headline()}")
        for run in self.running:
            tail = run.log_tail(1)
            table.add_row(f"  [cyan]▶ {run.cell.id}[/cyan] {_duration(run.elapsed)}  [dim]{escape(tail[0][:120]) if tail else ''}[/dim]")
        for line in self.failures[-5:]:
            table.add_row(f"  [red]✗ {escape(line)}[/red]")
        return table

    def say(self, line: str) -> None:
        if self.live_view is None:
            print(f"[suite] {line}", flush=True)
        else:
            self.live_view.console.print(line, highlight=False, markup=False)

    def started(self, run: CellRun) -> None:
        self.running.append(run)
        if self.live_view is None:
            self.say(f"{self.finished_count + 1}/{self.todo} {run.cell.id}: {run.plan.action}"
                     f"{' (' + run.plan.note + ')' if run.plan.note else ''}; log {run.run_dir / LOG}")
        self.refresh()

    def not_started(self, cell: Cell, note: str) -> None:
        self.counts["not started"] += 1
        self.failures.append(f"{cell.id}: not started, {note}")
        self.say(f"{cell.id}: not started ({note})")
        self.refresh()

    def finished(self, run: CellRun, code: int, state: CellState) -> None:
        self.running.remove(run)
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
        if self.live_view is not None:
            self.live_view.update(self._render())

    def close(self) -> None:
        if self.live_view is not None:
            self.live_view.update(self._render())
            self.live_view.stop()


def status_table(suite: Suite, cells: list[Cell], states: dict[str, CellState], plans: dict[str, Plan] | None = None):
    """The cells as a table: state (``(changed)`` when the file's options differ from those the
    cell ran with), exit code, attempts, time, test R@1 and a note."""
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
        if state.state == "interrupted" and state.checkpoint is not None and not state.changed:
            note = f"{note}; resumes from last.ckpt".strip("; ")
        if state.changed and "options changed" not in note:
            note = f"options changed: {'; '.join(state.changes)}; {note}".strip("; ")
        shown = f"[{colours.get(state.state, 'white')}]{state.state}[/]" + (" [magenta](changed)[/]" if state.changed else "")
        table.add_row(cell.id, shown, "" if state.exit_code is None else str(state.exit_code), str(state.attempts or ""),
                      _duration(state.seconds), state.r_at_1, escape(note[:100]))
    return table


def changed_lines(suite: Suite, cells: list[Cell], states: dict[str, CellState]) -> list[str]:
    """Every cell whose options changed since it ran, with what changed in full (the table's note
    is cut short), and what to do about it; no lines when none changed."""
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
    counts: dict[str, int] = {}
    changed = 0
    for state in states:
        counts[state.state] = counts.get(state.state, 0) + 1
        changed += state.changed
    order = ("completed", "running", "interrupted", "failed", "blocked", "pending")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) + (f" ({changed} changed)" if changed else "")


def _summary(suite: Suite, cells: list[Cell], states: dict[str, CellState], plans: dict[str, Plan]) -> None:
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
