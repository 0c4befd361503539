"""The submitit launchers: the cells as jobs on this machine or SLURM job arrays (one per stage)."""

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

from benchmark.app.suites.runner import CellRun, _Signals, _summary
from benchmark.app.suites.spec import EXIT_OK, LOG, Cell, Resources, Suite, _duration, _plural
from benchmark.app.suites.state import STARTS, cell_state, plan_cell, queued_on_slurm, submitted_jobs
from benchmark.core.errors import EXIT_FAILED, EXIT_SIGINT
from benchmark.core.io import atomic_write_text


# ---------------------------------------------------------------------------- submitit launchers
class CellJob(submitit.helpers.Checkpointable):
    """A submitit job running one cell (``run_one`` with the suite's rules).

    On SLURM's time limit or a preemption submitit calls :meth:`checkpoint`: the fit gets
    SIGTERM, saves ``last.ckpt`` and exits, and the job is requeued; the requeued job resumes
    the cell. In a job of several tasks (multi-GPU / multi-node DDP), task 0 decides how the
    cell starts and the other tasks run the same command (Lightning's SLURM environment wires
    the ranks).
    """

    def __init__(self, enforce_time: bool = True, restart_changed: bool = False) -> None:
        self.enforce_time = enforce_time  # resources.time: SIGTERM the fit (SLURM enforces it itself)
        self.restart_changed = restart_changed  # suite run --restart-changed
        self.run: CellRun | None = None

    def __call__(self, suite: Suite, cell_id: str, retry_failed: bool) -> dict[str, Any]:
        cell = suite.cell(cell_id)
        env = submitit.JobEnvironment()
        if env.num_tasks > 1 and env.global_rank != 0:
            return self._follow(suite, cell, env)
        plan = plan_cell(suite, cell, retry_failed, restart_changed=self.restart_changed)
        if plan.action == "skip":
            return {"cell": cell_id, "state": "completed", "exit_code": 0, "skipped": True}
        if plan.action not in STARTS:
            raise RuntimeError(f"{cell_id}: not started: {plan.note}")
        self.run = CellRun(suite, cell, plan)
        self.run.start()
        if env.num_tasks > 1:
            atomic_write_text(self.run.run_dir / f".launch-{env.job_id}.json", json.dumps({"command": self.run.command}))
        with _Signals() as signals:
            signals.running.append(self.run)
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
        if self.run is not None and self.run.poll() is None:
            self.run.send(signal.SIGTERM, "time limit or preemption (requeued)")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run.proc.wait(timeout=300)
            self.run.finish()
        self.run = None
        return submitit.helpers.DelayedSubmission(CellJob(self.enforce_time, self.restart_changed), *args, **kwargs)


def _executor(suite: Suite, launcher: str, resources: Resources, folder: Path):
    executor = submitit.AutoExecutor(folder=str(folder), cluster=launcher)
    gpus = 0
    if resources.accelerator not in ("cpu",) and isinstance(resources.devices, int):
        gpus = resources.devices
    params: dict[str, Any] = {"name": f"suite-{suite.name}", "nodes": resources.num_nodes or 1}
    if resources.time:
        params["timeout_min"] = int(max(1, round(resources.time)))
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
    """Cells grouped so that every cell comes after the cells it needs."""
    chosen = {c.id for c in cells}
    level: dict[str, int] = {}
    for cell in suite.cells:  # already in dependency order
        level[cell.id] = max([level[n] + 1 for n in cell.needs if n in chosen] or [0])
    stages: dict[int, list[Cell]] = {}
    for cell in cells:
        stages.setdefault(level[cell.id], []).append(cell)
    return [stages[k] for k in sorted(stages)]


class _Jobs:
    """The submitted jobs: ``jobs.json`` for the record, one line per job as it finishes."""

    def __init__(self, suite: Suite, folder: Path, total: int) -> None:
        self.suite, self.folder, self.total = suite, folder, total
        self.items: list[tuple[Cell, Any]] = []
        self.reported: set[str] = set()
        self.start = time.monotonic()
        self.record = submitted_jobs(folder)  # earlier submissions too: cell -> its latest job

    def add(self, cell: Cell, job: Any) -> None:
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
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - the job's failure is reported, not raised
                error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            print(f"[suite] {cell.id}: {state.state} (job {job.job_id}) — {len(self.reported)}/{self.total} finished, "
                  f"elapsed {_duration(time.monotonic() - self.start)}"
                  + (f"; {error}" if error and state.state != "completed" else ""), flush=True)
        return len(self.reported) == len(self.items)

    def wait(self) -> None:
        while not self.report_finished():
            time.sleep(1.0)

    def cancel(self) -> None:
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
    a stage after the previous one has finished). Each job runs :class:`CellJob`."""
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    plans = {c.id: plan_cell(suite, c, retry_failed, states, restart_changed) for c in cells}
    todo = [c for c in cells if plans[c.id].action in (*STARTS, "blocked")]
    folder = suite.output / ".submitit"
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
            groups: dict[Resources, list[Cell]] = {}
            for cell in stage:
                groups.setdefault(cell.resources, []).append(cell)
            stage_ids = []
            for resources, group in groups.items():
                executor = _executor(suite, launcher, resources, folder)
                job = CellJob(enforce_time=launcher != "slurm", restart_changed=restart_changed)  # SLURM: its own limit
                if launcher == "local":
                    _local_jobs(executor, job, group, retry_failed, max_parallel, resources, jobs)
                    continue
                if previous:
                    executor.update_parameters(slurm_additional_parameters={
                        **dict(suite.slurm.get("additional") or {}), "dependency": "afterok:" + ":".join(previous)})
                array = executor.map_array(job, [suite] * len(group), [c.id for c in group], [retry_failed] * len(group))
                for cell, submitted in zip(group, array):
                    jobs.add(cell, submitted)
                if array:
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
            if gpus:
                executor.update_parameters(visible_gpus=list(range(slot * gpus, (slot + 1) * gpus)))
            submitted = executor.submit(job, jobs.suite, cell.id, retry_failed)
            jobs.add(cell, submitted)
            running.append((submitted, slot))
        time.sleep(0.5)
        for submitted, slot in list(running):
            if submitted.done():
                running.remove((submitted, slot))
                free.append(slot)
        jobs.report_finished()
