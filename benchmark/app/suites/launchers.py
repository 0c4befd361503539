"""The submitit launchers: the cells as jobs on this machine or SLURM job arrays (one per stage).

The suite does not schedule jobs itself: submitit does, on this machine (``LocalExecutor``,
real subprocesses) or on a SLURM cluster (``sbatch`` job arrays). What runs inside every job
is :class:`CellJob`, which applies the suite's rules to its one cell (skip completed, resume
interrupted, refuse what cannot start) and runs the cell's ``fit`` as a subprocess, as the
serial runner does. Stages follow the cells' dependencies: under SLURM a later stage's arrays
wait for the earlier ones (``afterok``); locally a stage starts when the previous one ended.
Job logs and ``jobs.json`` (cell -> job id) go to ``<output>/.submitit/``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit
import torch

from benchmark.app.suites.fields import Resources
from benchmark.app.suites.runner import CellRun, _Signals, _summary
from benchmark.app.suites.spec import EXIT_OK, LOG, Cell, Suite, _duration, _plural
from benchmark.app.suites.state import STARTS, cell_state, plan_cell, queued_on_slurm, submitted_jobs
from benchmark.core.errors import EXIT_FAILED, EXIT_SIGINT
from benchmark.core.io import atomic_write_text

#: submitit's local executor's time limit for a cell without ``resources.time``: a year, i.e. none.
LOCAL_NO_LIMIT_MIN = 365 * 24 * 60


# ---------------------------------------------------------------------------- submitit launchers
class CellJob(submitit.helpers.Checkpointable):
    """A submitit job running one cell (with the rules of ``run_one``: skip, resume, refuse).

    On SLURM's time limit or a preemption submitit calls :meth:`checkpoint`: the fit gets
    SIGTERM, saves ``last.ckpt`` and exits, and the job is requeued; the requeued job resumes
    the cell. In a job of several tasks (multi-GPU / multi-node DDP), task 0 decides how the
    cell starts and the other tasks run the same command (Lightning's SLURM environment wires
    the ranks).

    A job pickles this object and the call's arguments; :meth:`checkpoint` returns a fresh
    one, so a requeued job carries no state of the attempt it replaces.

    Args:
        enforce_time: SIGTERM the fit after ``resources.time`` (the local launcher); under
            SLURM the scheduler's time limit and submitit's warning signal do it instead.
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
        self.run = CellRun(suite, cell, plan)
        self.run.start()
        # Hand the other tasks the exact command (with --ckpt_path when it resumes), so every
        # rank runs the same fit; Lightning joins them into one DDP run from SLURM's environment.
        if env.num_tasks > 1:
            atomic_write_text(self.run.run_dir / f".launch-{env.job_id}.json", json.dumps({"command": self.run.command}))
        with _Signals() as signals:
            signals.running.append(self.run)
            # Polled, so that the handlers (signals, submitit's checkpoint) and the time limit
            # run while the fit does.
            while self.run.poll() is None:
                if self.enforce_time:
                    self.run.check_time_limit()
                time.sleep(0.5)
            code = self.run.finish()
        state = cell_state(suite, cell)
        if code != 0:
            raise RuntimeError(f"{cell_id}: {state.state} (exit {code}): {state.reason}; log {self.run.run_dir / LOG}")
        return {"cell": cell_id, "state": state.state, "exit_code": code, "seconds": round(self.run.elapsed, 1)}

    def _follow(self, suite: Suite, cell: Cell, env: Any) -> dict[str, Any]:
        """Task ``global_rank`` > 0 of a multi-task job: run task 0's command, once it is written.

        Waits up to 10 minutes for task 0's launch file (it first moves folders aside or reads
        states); the output goes to ``fit.rank<n>.log`` beside the cell's ``fit.log``.

        Raises:
            RuntimeError: task 0 did not write its command in time.
        """
        launch = suite.run_dir(cell) / f".launch-{env.job_id}.json"
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
        if self.run is not None and self.run.poll() is None:
            self.run.send(signal.SIGTERM, "time limit or preemption (requeued)")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run.proc.wait(timeout=300)
            self.run.finish()
        self.run = None
        return submitit.helpers.DelayedSubmission(CellJob(self.enforce_time, self.restart_changed), *args, **kwargs)


def _executor(suite: Suite, launcher: str, resources: Resources, folder: Path):
    """A submitit executor for one resource set: ``launcher`` is ``local`` or ``slurm``.

    ``resources`` become submitit's parameters (nodes, time limit, CPUs, memory, GPUs) and, for
    SLURM, the ``slurm:`` section becomes ``slurm_*`` parameters (partition, account, qos,
    constraint, array parallelism, warning delay, setup lines, further sbatch options).
    """
    executor = submitit.AutoExecutor(folder=str(folder), cluster=launcher)
    # GPUs per node are requested only for an integer device count on a non-CPU accelerator:
    # "auto" says nothing submitit could reserve.
    gpus = 0
    if resources.accelerator not in ("cpu",) and isinstance(resources.devices, int):
        gpus = resources.devices
    params: dict[str, Any] = {"name": f"suite-{suite.name}", "nodes": resources.num_nodes or 1}
    if resources.time:
        params["timeout_min"] = int(max(1, round(resources.time)))  # submitit takes whole minutes
    elif launcher == "local":
        # No limit asked for: submitit's local executor would otherwise stop (and requeue, then fail) a
        # job after its default of a few minutes; a cell without resources.time runs until it ends.
        params["timeout_min"] = LOCAL_NO_LIMIT_MIN
    if resources.cpus_per_task:
        params["cpus_per_task"] = resources.cpus_per_task
    if resources.mem_gb:
        params["mem_gb"] = resources.mem_gb
    if launcher == "slurm":
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
        params["tasks_per_node"] = 1  # Lightning starts its own DDP processes on one machine
        if gpus:
            params["gpus_per_node"] = gpus
    executor.update_parameters(**params)
    return executor


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
        """Cancel the jobs that have not finished (Ctrl-C), then wait for all of them to end.

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






def run_submitit(suite: Suite, cells: list[Cell], retry_failed: bool, launcher: str, wait: bool,
                 max_parallel: int | None, restart_changed: bool = False) -> int:
    """Hand the cells to submitit: one job array per stage and resource set (SLURM; a later
    stage's arrays depend on the earlier ones), or local jobs (at most ``max_parallel`` at once,
    a stage after the previous one has finished). Each job runs :class:`CellJob`.

    Cells that SLURM still holds from an earlier submission are not submitted again.

    Args:
        suite: the loaded suite.
        cells: the selected cells.
        retry_failed: ``--retry-failed``, passed to every job.
        launcher: ``local`` or ``slurm``.
        wait: SLURM: wait for the jobs and print the summary (the local launcher always waits).
        max_parallel: local: at most this many jobs at once (default: one per GPU set).
        restart_changed: ``--restart-changed``, passed to every job.

    Returns:
        0 after a SLURM submission without ``wait``; otherwise 0 when every selected cell has
        completed, 1 when one has not, 130 after Ctrl-C (the jobs are cancelled).
    """
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    plans = {c.id: plan_cell(suite, c, retry_failed, states, restart_changed) for c in cells}
    todo = [c for c in cells if plans[c.id].action in (*STARTS, "blocked")]
    folder = suite.output / ".submitit"
    # A second `suite run --launcher slurm` must not queue a cell twice: two jobs would run
    # one cell into one folder.
    queued = queued_on_slurm(submitted_jobs(folder)) if launcher == "slurm" else {}
    for cell in [c for c in todo if c.id in queued]:
        print(f"[suite] {cell.id}: already submitted ({queued[cell.id]}); not submitted again", flush=True)
    todo = [c for c in todo if c.id not in queued]
    print(f"[suite] {suite.name}: {_plural(len(cells), 'cell')}, {len(todo)} to run with submitit ({launcher}); "
          f"job logs in {folder}", flush=True)
    jobs = _Jobs(suite, folder, len(todo))
    interrupted = None
    try:
        previous: list[str] = []  # the job arrays of the earlier stages (SLURM: afterok dependencies)
        for stage in _stages(suite, todo):
            # One job array per resource set: the sbatch options are per array.
            groups: dict[Resources, list[Cell]] = {}
            for cell in stage:
                groups.setdefault(cell.resources, []).append(cell)
            stage_ids = []
            for resources, group in groups.items():
                executor = _executor(suite, launcher, resources, folder)
                job = CellJob(enforce_time=launcher != "slurm", restart_changed=restart_changed)  # SLURM: its own limit
                if launcher == "local":  # returns once the group's jobs have finished
                    _local_jobs(executor, job, group, retry_failed, max_parallel, resources, jobs)
                    continue
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
        if launcher == "slurm" and wait:
            jobs.wait()
    except KeyboardInterrupt:
        interrupted = EXIT_SIGINT
        print("\n[suite] Ctrl-C: cancelling the jobs (running cells save last.ckpt and resume on the next run).",
              file=sys.stderr, flush=True)
        jobs.cancel()
    if launcher == "slurm" and not wait and interrupted is None:
        print(f"[suite] submitted; `python -m benchmark suite status {suite.path}` shows the cells' states "
              f"(job ids in {folder / 'jobs.json'}).", flush=True)
        return EXIT_OK
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    _summary(suite, cells, states, plans)
    if interrupted is not None:
        return interrupted
    return EXIT_OK if all(states[c.id].state == "completed" for c in cells) else EXIT_FAILED


def _local_jobs(executor: Any, job: CellJob, group: list[Cell], retry_failed: bool, max_parallel: int | None,
                resources: Resources, jobs: _Jobs) -> None:
    """Run ``group`` as local jobs, at most ``max_parallel`` at once, each on its own GPUs.

    submitit's local executor starts every job at once and shows each the same GPUs; here a job
    takes a free slot k and sees GPUs [k*g, (k+1)*g) (g = ``resources.devices``). Without
    ``--max-parallel``: one slot per GPU set, or every cell at once on a CPU-only machine.
    Returns once every job of the group has finished, reporting each as it ends.
    """
    gpus = resources.devices if isinstance(resources.devices, int) and resources.accelerator != "cpu" else 0
    available = torch.cuda.device_count() if gpus else 0
    if available < gpus:
        gpus = 0  # no (or too few) GPUs here: each cell runs as its accelerator setting decides
    slots = available // gpus if gpus else len(group)
    free = list(range(max(1, min(max_parallel or slots, slots))))
    pending, running = list(group), []
    while pending or running:
        while pending and free:
            cell, slot = pending.pop(0), free.pop(0)
            if gpus:  # submitit sets the job's CUDA_VISIBLE_DEVICES from visible_gpus
                executor.update_parameters(visible_gpus=list(range(slot * gpus, (slot + 1) * gpus)))
            submitted = executor.submit(job, jobs.suite, cell.id, retry_failed)
            jobs.add(cell, submitted)
            running.append((submitted, slot))
        time.sleep(0.5)
        # A finished job frees its slot (and GPUs) for the next pending cell.
        for submitted, slot in list(running):
            if submitted.done():
                running.remove((submitted, slot))
                free.append(slot)
        jobs.report_finished()
