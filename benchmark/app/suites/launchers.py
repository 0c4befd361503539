"""The one launcher path: every cell runs as a submitit job, on this machine or as SLURM job arrays.

The suite does not start or supervise processes itself: submitit does, on this machine
(``LocalExecutor``: ``suite run`` one job at a time, ``--launcher local`` several at once) or
on a SLURM cluster (``sbatch`` job arrays, one per stage and resource set). What runs inside
every job is :class:`CellJob`, which applies the suite's rules to its one cell (skip
completed, resume interrupted, refuse what cannot start) and runs the cell's attempt
(:func:`.runner.run_attempt`). Stages follow the cells' dependencies: under SLURM a later
stage's arrays wait for the earlier ones (``afterok``); here a cell is planned again right
before its job starts, once the cells it needs have ended. Job logs and ``jobs.json`` (cell ->
job id) go to ``<output>/.submitit/``.

Signals on this machine: the jobs do not share the terminal with the suite (their controller
ignores SIGINT, the job leaves the terminal's process group), so a Ctrl-C reaches the suite
alone, which starts no further job and relays the signal once to each running job
(:func:`relay`), whose fit then stops after its step and saves ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from benchmark.app.suites.fields import Resources
from benchmark.app.suites.runner import CellRun, SignalHandlers, job_attempt, run_attempt
from benchmark.app.suites.spec import EXIT_OK, LOG, Cell, Suite, _duration, _plural
from benchmark.app.suites.state import STARTS, cell_state, plan_cell, queued_on_slurm, submitted_jobs
from benchmark.app.suites.views import Progress, Watched, _summary
from benchmark.core.errors import EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM
from benchmark.core.io import atomic_write_text

#: submitit's local executor's time limit: a year, i.e. none. Its own limit would stop the job
#: with its checkpoint signal and requeue it on this machine; ``resources.time`` is enforced by
#: the job instead (:meth:`.runner.CellRun.wait`), which ends the cell interrupted, resumable.
LOCAL_NO_LIMIT_MIN = 365 * 24 * 60


# ---------------------------------------------------------------------------- the job
class CellJob(submitit.helpers.Checkpointable):
    """A submitit job running one cell (with the suite's rules: skip, resume, refuse).

    On SLURM's time limit or a preemption submitit calls :meth:`checkpoint`: the fit gets
    SIGTERM, saves ``last.ckpt`` and exits, and the job is requeued; the requeued job resumes
    the cell. In a job of several tasks (multi-GPU / multi-node DDP), task 0 decides how the
    cell starts and the other tasks run the same command (Lightning's SLURM environment wires
    the ranks).

    A job pickles this object and the call's arguments; :meth:`checkpoint` returns a fresh
    one, so a requeued job carries no state of the attempt it replaces.

    Args:
        enforce_time: SIGTERM the fit after ``resources.time`` (this machine); under SLURM the
            scheduler's time limit and submitit's warning signal do it instead.
        restart_changed: ``--restart-changed`` of the ``suite run`` that submitted the job.
    """

    def __init__(self, enforce_time: bool = True, restart_changed: bool = False) -> None:
        self.enforce_time = enforce_time  # resources.time: SIGTERM the fit (SLURM enforces it itself)
        self.restart_changed = restart_changed  # suite run --restart-changed
        self.run: CellRun | None = None

    def __call__(self, suite: Suite, cell_id: str, retry_failed: bool) -> dict[str, Any]:
        """Run the cell in this job (what submitit calls, in the job's process).

        Returns:
            A summary for ``job.result()``: the cell, its state and exit code (``skipped`` for a
            completed cell; ``rank`` for the tasks other than 0).

        Raises:
            RuntimeError: the cell was not started (failed and not retried, running elsewhere, a
                cell it needs not completed) or its fit ended with a non-zero exit code: raising
                makes submitit record the job as failed, so ``job.result()`` and the summary
                report it.
        """
        cell = suite.cell(cell_id)
        env = submitit.JobEnvironment()
        # Only task 0 plans: several tasks deciding at once could move the same folder aside.
        if env.num_tasks > 1 and env.global_rank != 0:
            return self._follow(suite, cell, env)
        plan = plan_cell(suite, cell, retry_failed, restart_changed=self.restart_changed)
        if plan.action == "skip":
            return {"cell": cell_id, "state": "completed", "exit_code": 0, "skipped": True}
        if plan.action not in STARTS:
            raise RuntimeError(f"{cell_id}: not started: {plan.note}")
        here = env.cluster == "local"
        if here:
            # Out of the terminal's process group: a Ctrl-C reaches the suite, which relays it once
            # (the job would otherwise get it twice, from the terminal and from the suite).
            with contextlib.suppress(OSError):
                os.setsid()
        self.run = CellRun(suite, cell, plan, job_id=str(env.job_id))
        # Under SLURM the scheduler signals the fit itself (scancel, preemption): relaying its
        # SIGTERM would be a second one, which aborts the fit before it has saved.
        run_attempt(self.run, enforce_time=self.enforce_time,
                    relay=(signal.SIGINT, signal.SIGTERM) if here else (signal.SIGINT,),
                    on_start=lambda run: self._hand_over(run, env))
        code = self.run.exit_code
        state = cell_state(suite, cell)
        if code != 0:
            raise RuntimeError(f"{cell_id}: {state.state} (exit {code}): {state.reason}; log {self.run.run_dir / LOG}")
        return {"cell": cell_id, "state": state.state, "exit_code": code, "seconds": round(self.run.elapsed, 1)}

    @staticmethod
    def _hand_over(run: CellRun, env: Any) -> None:
        """Task 0 of a multi-task job: hand the other tasks the exact command (``--ckpt_path``
        included when it resumes), so every rank runs the same fit; Lightning joins them into one
        DDP run from SLURM's environment."""
        if env.num_tasks > 1:
            atomic_write_text(launch_file(run.run_dir, env.job_id), json.dumps({"command": run.command}))

    def _follow(self, suite: Suite, cell: Cell, env: Any) -> dict[str, Any]:
        """Task ``global_rank`` > 0 of a multi-task job: run task 0's command, once it is written.

        Waits up to 10 minutes for task 0's launch file (it first moves folders aside or reads
        states); the output goes to ``fit.rank<n>.log`` beside the cell's ``fit.log``.

        Raises:
            RuntimeError: task 0 did not write its command in time.
        """
        launch = launch_file(suite.run_dir(cell), env.job_id)
        deadline = time.monotonic() + 600
        while not launch.is_file():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cell.id}: task 0 did not start the cell within 10 minutes")
            time.sleep(1)
        command = json.loads(launch.read_text())["command"]
        with open(suite.run_dir(cell) / f"fit.rank{env.global_rank}.log", "a") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        return {"cell": cell.id, "rank": env.global_rank, "exit_code": code}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """What submitit calls on its warning signal before the time limit (or on preemption).

        The running fit gets SIGTERM and up to 5 minutes to save ``last.ckpt`` and exit (SLURM
        ends the job at its limit, ``slurm.signal_delay_s`` after the warning: 120 s by default);
        the attempt is recorded, and the returned submission, a fresh job with the same
        arguments, is what submitit requeues. The requeued job finds the cell interrupted and
        resumes it.
        """
        if self.run is not None and self.run.proc is not None and self.run.proc.poll() is None:
            self.run.send(signal.SIGTERM, "time limit or preemption (requeued)")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run.proc.wait(timeout=300)
            self.run.finish()
        self.run = None
        return submitit.helpers.DelayedSubmission(CellJob(self.enforce_time, self.restart_changed), *args, **kwargs)


def launch_file(run_dir: Path, job_id: str) -> Path:
    """Where task 0 of a multi-task job leaves the fit's command for the other tasks.

    Named by the job and by SLURM's requeue count (``SLURM_RESTART_COUNT``): a requeued job
    keeps its id, and its other tasks must not start the previous attempt's command (without
    the ``--ckpt_path`` the new one resumes from) before task 0 has written the new one."""
    return run_dir / f".launch-{job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}.json"


def _executor(suite: Suite, launcher: str, resources: Resources, folder: Path):
    """A submitit executor for one resource set: ``launcher`` is ``local`` or ``slurm``.

    ``resources`` become submitit's parameters (nodes, time limit, CPUs, memory, GPUs) and, for
    SLURM, the ``slurm:`` section becomes ``slurm_*`` parameters (partition, account, qos,
    constraint, array parallelism, warning delay, setup lines, further sbatch options).
    """
    executor = submitit.AutoExecutor(folder=str(folder), cluster=launcher)
    gpus = _gpus(resources)
    params: dict[str, Any] = {"name": f"suite-{suite.name}", "nodes": resources.num_nodes or 1}
    if resources.cpus_per_task:
        params["cpus_per_task"] = resources.cpus_per_task
    if resources.mem_gb:
        params["mem_gb"] = resources.mem_gb
    if launcher == "slurm":
        if resources.time:
            params["timeout_min"] = int(max(1, round(resources.time)))  # submitit takes whole minutes
        params["gpus_per_node"] = gpus
        params["tasks_per_node"] = max(1, gpus)  # one task per GPU: Lightning's SLURM environment
        slurm = suite.slurm
        for key in ("partition", "account", "qos", "constraint", "array_parallelism", "signal_delay_s"):
            if slurm.get(key) is not None:
                params[f"slurm_{key}"] = slurm[key]
        # Time enough for the fit to finish its step and write last.ckpt after the warning.
        params.setdefault("slurm_signal_delay_s", 120)
        if slurm.get("setup"):
            params["slurm_setup"] = [str(line) for line in slurm["setup"]]
        if slurm.get("additional"):
            params["slurm_additional_parameters"] = dict(slurm["additional"])
    else:
        # The job enforces resources.time itself (LOCAL_NO_LIMIT_MIN says why).
        params["timeout_min"] = LOCAL_NO_LIMIT_MIN
        params["tasks_per_node"] = 1  # Lightning starts its own DDP processes on one machine
        # submitit shows a local job only the GPUs it is given (CUDA_VISIBLE_DEVICES): a cell that
        # asks for none by number (devices: auto, the default) sees every GPU, as its fit would alone.
        params["gpus_per_node"] = gpus if gpus else (0 if resources.accelerator == "cpu" else _gpus_here())
    executor.update_parameters(**params)
    return executor


def _gpus(resources: Resources) -> int:
    """GPUs per node a cell asks for: an integer device count on a non-CPU accelerator, else 0
    (``"auto"`` says nothing a launcher could reserve)."""
    if resources.accelerator != "cpu" and isinstance(resources.devices, int):
        return resources.devices
    return 0


def _gpus_here() -> int:
    """The GPUs of this machine (0 without CUDA).

    torch is imported here, not with the module: every job imports this module to unpickle its
    :class:`CellJob`, and a second of torch's import per cell is paid for nothing there (its
    fit imports torch itself)."""
    import torch

    return torch.cuda.device_count()


def default_parallel(cells: list[Cell]) -> int:
    """``--launcher local`` without ``--max-parallel``: one job per GPU set of this machine (a cell
    asking for no GPUs by number uses them all: one job at a time), every cell at once without GPUs."""
    here = _gpus_here()
    if not here:
        return max(1, len(cells))
    per_job = max([_gpus(c.resources) for c in cells] or [0])
    return max(1, here // per_job) if per_job else 1


def _stages(suite: Suite, cells: list[Cell]) -> list[list[Cell]]:
    """Cells grouped so that every cell comes after the cells it needs.

    A cell's stage is one more than the highest stage of the selected cells it needs (0 when
    it needs none of them): a need outside the selection is not waited for here, and the
    job's own plan does not start the cell unless that need has completed. Returns the stages
    in order, each in suite order.
    """
    chosen = {c.id for c in cells}
    level: dict[str, int] = {}
    for cell in suite.cells:  # already in dependency order
        level[cell.id] = max([level[n] + 1 for n in cell.needs if n in chosen] or [0])
    stages: dict[int, list[Cell]] = {}
    for cell in cells:
        stages.setdefault(level[cell.id], []).append(cell)
    return [stages[k] for k in sorted(stages)]


# ---------------------------------------------------------------------------- this machine
def _submit(executor: Any, job: CellJob, suite: Suite, cell: Cell, retry_failed: bool) -> Any:
    """Submit ``cell`` as a local job whose controller ignores Ctrl-C.

    submitit's local controller turns a Ctrl-C into killing its job a second later, before the
    fit could save; it is started with SIGINT ignored (a disposition a child process inherits),
    and the suite relays the signal to the job instead (:func:`relay`). The job itself handles
    SIGINT again (:class:`.runner.Relay`).
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to ignore
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return executor.submit(job, suite, cell.id, retry_failed)
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGINT, previous)


def relay(suite: Suite, watched: Watched, signum: int) -> bool:
    """Send ``signum`` to the job running ``watched``'s cell, if its attempt has started.

    The job's process is the one its attempt recorded for this job (its id: submitit's job id);
    the job relays the signal to the fit. Returns False when the attempt has not started yet
    (the caller tries again) or has ended.
    """
    attempt = job_attempt(suite.run_dir(watched.cell), str(watched.job.job_id))
    if attempt is None:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(int(attempt["pid"]), signum)
    return True


class _Stop(SignalHandlers):
    """SIGINT / SIGTERM to the suite while its jobs run here: say so once, start no further job,
    relay every signal to the running jobs (a second Ctrl-C too: the fits then abort), exit 130 / 143.

    A context manager: the previous handlers come back on exit. ``watching`` is the list of
    running jobs the caller keeps current; a signal that came before a job's attempt started is
    relayed by :meth:`flush`, which the caller calls while it waits.
    """

    def __init__(self, suite: Suite) -> None:
        super().__init__()
        self.suite = suite
        self.received: int | None = None
        self.watching: list[Watched] = []
        self._pending: dict[int, list[int]] = {}  # id(watched) -> signals not relayed yet

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"\n[suite] {name}: stopping the running cells (they save last.ckpt and resume on the next run); "
                  "no further cell starts.", file=sys.stderr, flush=True)
        for watched in self.watching:
            self._pending.setdefault(id(watched), []).append(signum)
        self.flush()

    def flush(self) -> None:
        """Relay the signals each running job has not received yet, where its attempt has started."""
        for watched in self.watching:
            pending = self._pending.get(id(watched), [])
            while pending and relay(self.suite, watched, pending[0]):
                watched.relayed.append(pending.pop(0))

    def watch(self, watched: Watched) -> None:
        """A job has started: a signal received before it started is relayed to it too."""
        self.watching.append(watched)
        if self.received is not None:
            self._pending[id(watched)] = [self.received]

    @property
    def exit_code(self) -> int | None:
        """130 after SIGINT, 143 after SIGTERM (the shell's 128 + signal), None without a signal."""
        if self.received is None:
            return None
        return EXIT_SIGINT if self.received == signal.SIGINT else EXIT_SIGTERM


def run_here(suite: Suite, cells: list[Cell], retry_failed: bool, max_parallel: int = 1, live: bool | None = None,
             restart_changed: bool = False, launcher: str = "serial") -> int:
    """Run the cells as submitit jobs on this machine, at most ``max_parallel`` at once (``suite run``: one).

    Completed cells are skipped; failed ones are only reported unless ``retry_failed``; a cell
    is planned again right before its job starts, in the suite's (dependency) order, so that a
    cell that needs another starts once that one has completed (and is not started when it
    failed). With several GPUs and a cell asking for ``devices: g``, a job takes a free slot
    k and sees GPUs [k*g, (k+1)*g). A SIGINT / SIGTERM stops the running fits cleanly (they save
    ``last.ckpt``) and starts no further cell.

    Args:
        suite: the loaded suite.
        cells: the selected cells (``--only``), in the suite's order.
        retry_failed: ``--retry-failed``.
        max_parallel: the most jobs at once (``--max-parallel``; ``suite run`` without a launcher: 1).
        live: force the live progress view on or off (default: on a terminal).
        restart_changed: ``--restart-changed``.
        launcher: ``serial`` (``suite run``) or ``local`` (``--launcher local``, whose jobs are
            recorded in ``jobs.json``, as SLURM's are; a serial run's jobs are its own business).

    Returns:
        0 when every selected cell is completed afterwards, 1 otherwise, 130 / 143 when a
        signal stopped the run.
    """
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    plans = {c.id: plan_cell(suite, c, retry_failed, states, restart_changed) for c in cells}
    # Blocked cells are attempted too: the cells they need may complete earlier in this run.
    todo = [c for c in cells if plans[c.id].action in (*STARTS, "blocked")]
    skipped = [c for c in cells if plans[c.id].action == "skip"]
    reported = [c for c in cells if plans[c.id].action in ("report", "wait", "refuse")]
    folder = suite.output / ".submitit"
    # One line up front: what this run will do, before the first fit's output starts.
    print(f"[suite] {suite.name}: {_plural(len(cells), 'cell')} in {suite.output}: {len(skipped)} completed (skipped), "
          f"{len(todo)} to run, {len(reported)} failed or running elsewhere (not started); "
          f"{launcher}: {'one job at a time' if max_parallel == 1 else f'up to {max_parallel} jobs at once'}, "
          f"job logs in {folder}",
          flush=True)
    progress = Progress(suite, len(todo), live=live)
    jobs = _Jobs(suite, folder, len(todo))
    job = CellJob(enforce_time=True, restart_changed=restart_changed)
    pending = list(todo)
    free_slots = list(range(max(1, max_parallel)))
    slots: dict[int, int] = {}  # id(watched) -> its slot
    with _Stop(suite) as stop:
        try:
            while (pending and stop.received is None) or stop.watching:
                # Start jobs while there are free slots; a cell waits while a cell it needs is running
                # or still to start (its plan would otherwise find that need not completed).
                while pending and free_slots and stop.received is None:
                    unfinished = {w.cell.id for w in stop.watching} | {c.id for c in pending}
                    ready = [c for c in pending if not set(c.needs) & unfinished]
                    if not ready:
                        break
                    cell = ready[0]
                    pending.remove(cell)
                    plan = plan_cell(suite, cell, retry_failed, restart_changed=restart_changed)  # needs may have ended
                    plans[cell.id] = plan
                    if plan.action not in STARTS:  # e.g. a cell it needs failed earlier in this run
                        states[cell.id] = plan.state
                        progress.not_started(cell, plan.note)
                        continue
                    slot = free_slots.pop(0)
                    executor = _executor(suite, "local", cell.resources, folder)
                    gpus = _gpus(cell.resources)
                    if gpus and _gpus_here() >= (slot + 1) * gpus:  # its own GPUs (CUDA_VISIBLE_DEVICES)
                        executor.update_parameters(visible_gpus=list(range(slot * gpus, (slot + 1) * gpus)))
                    watched = Watched(cell, plan, suite.run_dir(cell))
                    watched.job = _submit(executor, job, suite, cell, retry_failed)
                    if launcher == "local":
                        jobs.add(cell, watched.job)
                    slots[id(watched)] = slot
                    stop.watch(watched)
                    progress.started(watched)
                stop.flush()
                progress.refresh()
                time.sleep(0.25)
                for watched in [w for w in stop.watching if w.job.done()]:
                    stop.watching.remove(watched)
                    free_slots.append(slots.pop(id(watched)))
                    states[watched.cell.id] = state = cell_state(suite, watched.cell)
                    attempt = job_attempt(watched.run_dir, str(watched.job.job_id), ended=True) or {}
                    progress.finished(watched, attempt.get("exit_code", EXIT_FAILED), state)
        finally:
            progress.close()
    _summary(suite, cells, states, plans)
    if stop.exit_code is not None:  # stopped: 130 / 143 whatever the cells' states
        return stop.exit_code
    return EXIT_OK if all(states[c.id].state == "completed" for c in cells) else EXIT_FAILED


# ---------------------------------------------------------------------------- SLURM
class _Jobs:
    """The submitted jobs: ``jobs.json`` for the record, one line per job as it finishes.

    ``jobs.json`` keeps earlier submissions too (a cell's latest job wins), so that ``suite
    status`` and a later ``suite run --launcher slurm`` know every cell's job, whichever run
    submitted it.
    """

    def __init__(self, suite: Suite, folder: Path, total: int) -> None:
        self.suite, self.folder, self.total = suite, folder, total
        self.items: list[tuple[Cell, Any]] = []
        self.reported: set[str] = set()
        self.start = time.monotonic()
        self.record = submitted_jobs(folder)  # earlier submissions too: cell -> its latest job

    def add(self, cell: Cell, job: Any) -> None:
        """Track a newly submitted job and rewrite ``jobs.json`` (atomically: ``suite status`` reads it)."""
        self.items.append((cell, job))
        self.record[cell.id] = str(job.job_id)
        payload = [{"cell": c, "job_id": j} for c, j in self.record.items()]
        atomic_write_text(self.folder / "jobs.json", json.dumps(payload, indent=2) + "\n")

    def report_finished(self) -> bool:
        """Print the jobs that finished since the last call; True when every job has finished."""
        for cell, job in self.items:
            if cell.id in self.reported or not job.done():
                continue
            self.reported.add(cell.id)
            state = cell_state(self.suite, cell)
            error = ""
            # The job's exception (CellJob raises for a cell that did not complete) is shown by
            # its last line; the cell's state on disk says the rest.
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - the job's failure is reported, not raised
                error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            print(f"[suite] {cell.id}: {state.state} (job {job.job_id}) — {len(self.reported)}/{self.total} finished, "
                  f"elapsed {_duration(time.monotonic() - self.start)}"
                  + (f"; {error}" if error and state.state != "completed" else ""), flush=True)
        return len(self.reported) == len(self.items)

    def wait(self) -> None:
        """Block until every job has finished, reporting each as it does (polled every second)."""
        while not self.report_finished():
            time.sleep(1.0)

    def cancel(self) -> None:
        """Cancel the jobs that have not finished (Ctrl-C; SLURM's scancel), then wait for all of them to end.

        Errors are ignored: a job may finish between the check and the cancel, and the user asked
        to stop; waiting keeps the suite from exiting while a job is still winding down.
        """
        for _, job in self.items:
            if not job.done():
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
        for _, job in self.items:
            with contextlib.suppress(Exception):
                job.wait()


def run_slurm(suite: Suite, cells: list[Cell], retry_failed: bool, wait: bool, restart_changed: bool = False) -> int:
    """Hand the cells to SLURM through submitit: one job array per stage and resource set, a later
    stage's arrays depending on the earlier ones (``afterok``). Each job runs :class:`CellJob`.

    Cells that SLURM still holds from an earlier submission are not submitted again.

    Args:
        suite: the loaded suite.
        cells: the selected cells.
        retry_failed: ``--retry-failed``, passed to every job.
        wait: wait for the jobs and print the summary (default: submit and return).
        restart_changed: ``--restart-changed``, passed to every job.

    Returns:
        0 after a submission without ``wait``; otherwise 0 when every selected cell has
        completed, 1 when one has not, 130 after Ctrl-C (the jobs are cancelled).
    """
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    plans = {c.id: plan_cell(suite, c, retry_failed, states, restart_changed) for c in cells}
    todo = [c for c in cells if plans[c.id].action in (*STARTS, "blocked")]
    folder = suite.output / ".submitit"
    # A second `suite run --launcher slurm` must not queue a cell twice: two jobs would run
    # one cell into one folder.
    queued = queued_on_slurm(submitted_jobs(folder))
    for cell in [c for c in todo if c.id in queued]:
        print(f"[suite] {cell.id}: already submitted ({queued[cell.id]}); not submitted again", flush=True)
    todo = [c for c in todo if c.id not in queued]
    print(f"[suite] {suite.name}: {_plural(len(cells), 'cell')}, {len(todo)} to run with submitit (slurm); "
          f"job logs in {folder}", flush=True)
    jobs = _Jobs(suite, folder, len(todo))
    interrupted = None
    try:
        previous: list[str] = []  # the job arrays of the earlier stages (afterok dependencies)
        for stage in _stages(suite, todo):
            # One job array per resource set: the sbatch options are per array.
            groups: dict[Resources, list[Cell]] = {}
            for cell in stage:
                groups.setdefault(cell.resources, []).append(cell)
            stage_ids = []
            for resources, group in groups.items():
                executor = _executor(suite, "slurm", resources, folder)
                job = CellJob(enforce_time=False, restart_changed=restart_changed)  # SLURM enforces its own limit
                # afterok: a later stage starts only once every earlier array succeeded; the
                # file's own additional sbatch options are kept beside the dependency.
                if previous:
                    executor.update_parameters(slurm_additional_parameters={
                        **dict(suite.slurm.get("additional") or {}), "dependency": "afterok:" + ":".join(previous)})
                array = executor.map_array(job, [suite] * len(group), [c.id for c in group], [retry_failed] * len(group))
                for cell, submitted in zip(group, array):
                    jobs.add(cell, submitted)
                if array:  # element ids are "<array>_<index>"; dependencies name the array
                    stage_ids.append(str(array[0].job_id).split("_")[0])
                    print(f"[suite] submitted {_plural(len(group), 'cell')} as job array {stage_ids[-1]}", flush=True)
            previous += stage_ids
        if wait:
            jobs.wait()
    except KeyboardInterrupt:
        interrupted = EXIT_SIGINT
        print("\n[suite] Ctrl-C: cancelling the jobs (running cells save last.ckpt and resume on the next run).",
              file=sys.stderr, flush=True)
        jobs.cancel()
    if not wait and interrupted is None:
        print(f"[suite] submitted; `python -m benchmark suite status {suite.path}` shows the cells' states "
              f"(job ids in {folder / 'jobs.json'}).", flush=True)
        return EXIT_OK
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    _summary(suite, cells, states, plans)
    if interrupted is not None:
        return interrupted
    return EXIT_OK if all(states[c.id].state == "completed" for c in cells) else EXIT_FAILED
