"""One attempt of a cell, inside the job that runs it: its ``fit`` process, record, log, signals and time limit.

Every launcher reaches a cell the same way: submitit starts a job (:class:`.launchers.CellJob`;
``suite run`` one job after another on this machine, ``--launcher local`` several at once,
``--launcher slurm`` as job arrays), and the job runs :func:`run_attempt` for its cell; ``suite
run-cell`` (a W&B agent's unit) is such a job already and calls it directly. Scheduling,
process start-up, time limits on a cluster and requeueing are submitit's; what this module adds
is what submitit does not know about a ``fit``:

* the fit runs as its own ``python -m benchmark fit`` child of the job, never inside it: a
  clean interpreter exactly as a user's own ``fit`` (Lightning's DDP launcher re-runs the
  process's own command line for its workers, which in a submitit job would be the job again);
* its output goes to the cell's ``fit.log`` and its attempts to the cell's ``suite.json``,
  written when the attempt starts (a job killed meanwhile leaves a trace) and when it ends;
* a signal the job receives is relayed to the fit once (:class:`Relay`), so a Ctrl-C makes the
  fit stop after its step and save ``last.ckpt``; ``resources.time`` is a timed wait on the
  fit (local jobs; SLURM enforces its own limit), after which the fit gets SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmark.app.suites.spec import LOG, RECORD, Cell, Suite, _duration
from benchmark.app.suites.state import Plan, _move_aside, _read_json, fit_command
from benchmark.core.errors import EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM
from benchmark.core.io import atomic_write_text


class CellRun:
    """One attempt of a cell: a ``fit`` child process with its output in ``fit.log``.

    The job drives it: :meth:`start`, :meth:`wait` (the fit's end, or the time limit), then
    :meth:`finish`, which records the exit code. The attempt records the job's process id
    (``pid``): the process a suite relays a Ctrl-C to (:func:`.launchers.relay`).

    Attributes:
        run_dir: the cell's run directory.
        proc: the fit's process, once started.
        signals: the signals sent to the fit so far (the time limit's SIGTERM included).
        reason: why the attempt ended, as recorded: the first signal's reason, else the fit's
            last error line from its log.
        attempts: every attempt recorded in ``suite.json``, this one last.
    """

    def __init__(self, suite: Suite, cell: Cell, plan: Plan, job_id: str | None = None) -> None:
        """Prepare an attempt of ``cell`` as ``plan`` says (``run``, ``resume``, ``retry``, ``restart``),
        in the submitit job ``job_id`` (None: ``run-cell``, the process itself)."""
        self.suite, self.cell, self.plan, self.job_id = suite, cell, plan, job_id
        self.exit_code: int | None = None
        self.run_dir = suite.run_dir(cell)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.signals: list[int] = []
        self.reason = ""
        self.attempts: list[dict[str, Any]] = []

    def start(self) -> None:
        """Set the folder up, record the attempt, and start the fit.

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
        # No stdin: a fit must never wait for input nobody can give. Its own session: a Ctrl-C at
        # a terminal reaches the job, which relays it once (:class:`Relay`); the fit would
        # otherwise get it twice, from the terminal and from the job, and abort without saving.
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            self.command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )

    @property
    def elapsed(self) -> float:
        """Seconds since the fit started (monotonic clock); 0 before :meth:`start`."""
        return time.monotonic() - self.started if self.started else 0.0

    def send(self, signum: int, reason: str = "") -> None:
        """Send a signal to the fit (a no-op once it has ended).

        Args:
            signum: the signal, e.g. ``signal.SIGTERM``.
            reason: recorded as the attempt's reason unless an earlier signal gave one.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signals.append(signum)
        self.reason = self.reason or reason
        # The fit may end between the poll above and here: a process that is gone is not an error.
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    def wait(self, time_limit_min: float | None = None) -> int:
        """Wait for the fit to end; past ``time_limit_min`` minutes it gets SIGTERM, once.

        After the SIGTERM the fit stops after its current step and saves ``last.ckpt``, so the
        cell ends interrupted and the next ``suite run`` resumes it, as a cluster's time limit
        would. A signal relayed meanwhile (:class:`Relay`) interrupts the wait only to run its
        handler; the wait goes on until the fit has ended.

        Returns:
            The fit's exit code (see :meth:`finish`).
        """
        assert self.proc is not None, "start() first"
        if time_limit_min:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.proc.wait(timeout=max(0.0, time_limit_min * 60 - self.elapsed))
            if not self.signals:  # a fit already stopping (Ctrl-C) is left to finish saving
                self.send(signal.SIGTERM, f"time limit ({_duration(time_limit_min * 60)}) reached")
        return self.proc.wait()

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
            errors = [line for line in log_tail(self.run_dir, 40) if line.startswith(("error:", "Error", "Traceback"))]
            last = log_tail(self.run_dir, 1)
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
                   "host": socket.gethostname(), "pid": os.getpid(), "job_id": self.job_id}
        if code is None:
            self.attempts.append(attempt)
        else:  # the attempt appended by start(), completed with how it ended
            self.attempts[-1].update(exit_code=code, seconds=round(self.elapsed, 1), reason=self.reason)
        payload = {"suite": str(self.suite.path), "cell": self.cell.id, "argv": self.cell.argv, "attempts": self.attempts}
        atomic_write_text(self.run_dir / RECORD, json.dumps(payload, indent=2) + "\n")


def log_tail(run_dir: Path, lines: int = 1) -> list[str]:
    """The last ``lines`` non-empty lines of a cell's ``fit.log``, without colour codes or the suite's
    own header lines; ``[]`` when the log cannot be read.

    Only the last 16 KiB are read, so the progress view can call it twice a second on a log of
    any size. Carriage returns count as line ends: progress bars rewrite one line with them.
    """
    try:
        with open(run_dir / LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    parts = [p.strip() for p in re.split(r"[\r\n]", text) if p.strip() and not p.startswith("=====")]
    return parts[-lines:]


class SignalHandlers:
    """A context manager that routes ``signals`` to :meth:`_handle` while it is entered and
    restores the previous handlers on exit.

    Python installs handlers only from the main thread; elsewhere (a test running a command in
    a thread) the default handling stays.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self._signals = signals
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Any:
        with contextlib.suppress(ValueError):  # not the main thread
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(ValueError):
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        raise NotImplementedError


class Relay(SignalHandlers):
    """SIGINT / SIGTERM received by the job while its fit runs: relayed to the fit, each once.

    The first signal makes the fit stop after its step and save ``last.ckpt`` (exit 130 / 143),
    a second one makes it abort. A signal that arrives before the fit has started is kept and
    sent as soon as it has (:meth:`attach`). ``received`` is the first signal, if any.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """Relay ``signals`` (a SLURM job relays SIGINT only: SLURM signals the fit itself)."""
        super().__init__(signals)
        self.received: int | None = None
        self.run: CellRun | None = None

    def attach(self, run: CellRun) -> None:
        """The fit has started: from now on signals go to it, and one that came earlier goes now."""
        self.run = run
        if self.received is not None:
            run.send(self.received, _stopped_by(self.received))

    def _handle(self, signum: int, frame: Any) -> None:
        """Remember the first signal and relay every signal to the fit, if it runs."""
        if self.received is None:
            self.received = signum
        if self.run is not None:
            self.run.send(signum, _stopped_by(signum))


def _stopped_by(signum: int) -> str:
    """``stopped by SIGINT``: the reason recorded for an attempt a signal ended."""
    return f"stopped by {signal.Signals(signum).name}"


def run_attempt(run: CellRun, enforce_time: bool = True, relay: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                on_start: Callable[[CellRun], None] | None = None) -> int:
    """Run one attempt in this process's job: start the fit, wait for it, record how it ended.

    Args:
        run: the attempt, not started yet.
        enforce_time: SIGTERM the fit after ``resources.time`` (a scheduler that enforces its
            own limit, SLURM, needs no second one).
        relay: the signals this process relays to the fit (:class:`Relay`).
        on_start: called once the fit has started (a multi-task job hands its command over).

    Returns:
        The fit's exit code, also kept as ``run.exit_code``.
    """
    with Relay(relay) as relayed:
        run.start()
        relayed.attach(run)
        if on_start is not None:
            on_start(run)
        run.wait(run.cell.resources.time if enforce_time else None)
        run.exit_code = run.finish()
    return run.exit_code


def job_attempt(run_dir: Path, job_id: str, ended: bool = False) -> dict[str, Any] | None:
    """The attempt job ``job_id`` recorded in the cell's ``suite.json`` (its ``pid``, and its
    ``exit_code`` once it has ended).

    Args:
        run_dir: the cell's run directory.
        job_id: the submitit job's id.
        ended: the attempt once it has ended; by default the attempt while it runs.

    Returns:
        The attempt, or None: the job has recorded none yet, or it has (not) ended.
    """
    attempts = _read_json(run_dir / RECORD).get("attempts", [])
    for attempt in reversed(attempts):
        if str(attempt.get("job_id")) == job_id:
            return attempt if ("exit_code" in attempt) == ended else None
    return None
