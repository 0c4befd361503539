"""What the framework costs over a bare PyTorch training loop, per method.

    python -m benchmark perf train                          # every method, embedded default + in-memory batches
    python -m benchmark perf train --methods ms,dmcac --steps 30
    python -m benchmark perf train --real-batch cub         # each method at its CUB recipe's batch size
    python -m benchmark perf train --profile                # + where the difference goes (Lightning's SimpleProfiler)
    python -m benchmark perf train --tiny                   # seconds: the code path CI runs

For each method the run builds what ``fit`` builds (the recipe on the embedded synthetic
dataset: its Trainer, callbacks, logger, progress bar, precision and threads) and times
training steps two ways on the same model, the same batches, the same precision and the same
threads:

* **framework**: ``trainer.fit`` for ``warmup + steps`` batches (validation off; the
  checkpoint, figure, learning-rate and progress-bar callbacks and the logger as ``fit`` has
  them); a callback stamps the start of every batch;
* **bare**: a plain loop over the same batches: the method's ``training_loss`` under the
  trainer's precision context, ``backward``, gradient clipping when the recipe clips, the
  optimizer and per-step scheduler from the method's ``configure_optimizers``, ``zero_grad``.

A step is measured from the start of one batch to the start of the next (fetching the next
batch included), after ``warmup`` steps; the bare loop runs after the framework's fit, so the
state a method builds in its hooks (Context-Refine's training bank, DMCAC's database) is in
place. Two batch sources: ``embedded`` (both loops read the datamodule's loader, workers and
all) and ``memory`` (both read the same batches held in memory: compute only). The overhead
is ``framework / bare - 1`` of the mean step time; the table also shows medians. Goals
(issue #17): at most 5 % at the embedded recipes' batch sizes and 2 % at real-dataset batch
sizes. ``--profile`` adds one profiled fit per method and lists the framework's own actions
(hooks, logging, data fetching) per step, largest first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device

from benchmark.app.builder import build_cli
from benchmark.core import registry
from benchmark.core.contracts import UnknownNameError, perf_headline, register_perf
from benchmark.core.defaults import recipe_dir
from benchmark.core.io import atomic_write_text
from benchmark.core.io import console as make_console

TARGET_EMBEDDED = 0.05  # overhead at the embedded recipes' batch sizes
TARGET_REAL = 0.02  # at real-dataset batch sizes
# float32 in the tiny path (CI): the same numbers on every CPU. ``auto`` picks bf16 autocast on CPUs with
# native bf16, where this 16-px conv net gave NaN gradients at its first steps (2-core AMD EPYC, AVX512-BF16).
TINY = ["--backbone", "resnet_tiny_test", "--backbone.pretrained", "false", "--model.embedding_dim", "16",
        "--data.image_size", "16", "--data.num_workers", "0", "--trainer.precision", "32-true"]  # fmt: skip
SOURCES = ("embedded", "memory")  # --sources: the datamodule's loader, or the same batches held in memory
# The encoder of a method whose training batches carry no images (it trains on embeddings cached
# before the first step, e.g. Context-Refine's training bank): the step never runs it, so a tiny
# random one with a head to the recipe's embedding size gives the same step and embeds the bank in
# seconds instead of minutes.
BANK_ENCODER = ["--backbone", "resnet_tiny_test"]


# ---------------------------------------------------------------------------- timing
def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timestamp means what it says."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(Callback):
    """Stamps the start of every training batch (after it is fetched and on the device).

    The framework's side of the comparison: the bare loop stamps the same point of its own steps
    (after the batch is moved to the device), so both step times cover fetch, transfer, forward,
    backward and optimizer step, plus whatever the framework adds.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []  # perf_counter() at each batch start, reset per round

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        sync_device(pl_module.device)  # the previous step's kernels are finished: its time is complete
        self.stamps.append(time.perf_counter())


def step_times(stamps: list[float], warmup: int) -> list[float]:
    """Seconds of each step after ``warmup``: start of a batch to the start of the next.

    ``warmup + steps + 1`` stamps give ``steps`` times: the last stamp only closes the last step.
    """
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]


@dataclass
class Result:
    """One method and batch source: per-step seconds of both loops and the overhead.

    ``bare`` and ``framework`` gather the step times of every round (``--rounds``); the means and
    medians are over all of them.
    """

    method: str
    source: str
    batch_size: int  # samples per batch (labels; a multi-view batch counts each image once)
    precision: str  # the trainer's resolved precision, which both loops use
    threads: int  # torch's intra-op threads, the same for both loops
    device: str
    bare: list[float] = field(default_factory=list)
    framework: list[float] = field(default_factory=list)
    profile: list[tuple[str, float]] = field(default_factory=list)  # (action, seconds per step)
    note: str = ""
    trained_params: int = 0  # parameters the optimizer updates: what a step trains

    @property
    def bare_mean(self) -> float:
        """Mean step time of the bare loop, seconds (NaN without steps)."""
        return statistics.fmean(self.bare) if self.bare else float("nan")

    @property
    def framework_mean(self) -> float:
        """Mean step time through Lightning, seconds (NaN without steps)."""
        return statistics.fmean(self.framework) if self.framework else float("nan")

    @property
    def images_per_second(self) -> float:
        """Training images per second through the framework (a multi-view batch counts its images once)."""
        return self.batch_size / self.framework_mean if self.framework else float("nan")

    @property
    def overhead(self) -> float:
        """Measured: the framework's mean step time over the bare loop's, minus 1 (noisy on a shared CPU)."""
        return self.framework_mean / self.bare_mean - 1.0 if self.bare and self.framework else float("nan")

    @property
    def attributed(self) -> float:
        """Profiled: the framework's own actions per step over the bare loop's median step (NaN unprofiled)."""
        return own_seconds(self.profile) / statistics.median(self.bare) if self.profile and self.bare else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """The fields and the derived numbers (means, medians, overhead, attributed), for the JSON file."""
        out = asdict(self)
        out.update(bare_mean_s=self.bare_mean, framework_mean_s=self.framework_mean, overhead=self.overhead,
                   images_per_second=self.images_per_second, attributed=self.attributed,
                   framework_own_s=own_seconds(self.profile) if self.profile else None,
                   bare_median_s=statistics.median(self.bare) if self.bare else None,
                   framework_median_s=statistics.median(self.framework) if self.framework else None)
        return out


# ---------------------------------------------------------------------------- the two loops
def _optimizer_and_scheduler(model: L.LightningModule) -> tuple[torch.optim.Optimizer, Any, str]:
    """The method's own optimizer and scheduler (``configure_optimizers``), as Lightning reads them.

    Only the forms the methods return are read: an optimizer, or a dict with ``optimizer`` and an
    optional ``lr_scheduler`` (a scheduler, or a dict with ``scheduler`` and ``interval``).

    Returns:
        ``(optimizer, scheduler or None, interval)``; ``interval`` is Lightning's default ``"epoch"``
        unless the method says ``"step"`` (only per-step schedulers step inside the timed loop).

    Raises:
        TypeError: another form (a list of optimizers, a tuple).
    """
    config = model.configure_optimizers()
    if isinstance(config, torch.optim.Optimizer):
        return config, None, "epoch"
    if isinstance(config, dict):
        scheduler = config.get("lr_scheduler")
        if isinstance(scheduler, dict):
            return config["optimizer"], scheduler["scheduler"], scheduler.get("interval", "epoch")
        return config["optimizer"], scheduler, "epoch"
    raise TypeError(f"perf train: configure_optimizers returned {type(config).__name__}; expected an optimizer or a dict.")


def bare_loop(
    model: L.LightningModule,
    batches: Iterable[Any],
    steps: int,
    warmup: int,
    device: torch.device,
    precision_context: Callable[[], contextlib.AbstractContextManager],
    clip_norm: float | None,
) -> list[float]:
    """The same training steps without Lightning: per-step seconds after ``warmup``.

    A fresh optimizer from ``configure_optimizers`` (its state is not the fit's; a step costs the
    same). The step is what Lightning's automatic optimisation does for these methods, and nothing
    more: no logging, no hooks, no callbacks.

    Args:
        model: the method, already on ``device``.
        batches: the training batches (the datamodule's loader, or the in-memory batches).
        steps: timed steps.
        warmup: untimed steps first.
        device: where the batches are moved.
        precision_context: the trainer's autocast context (``precision_plugin.forward_context``).
        clip_norm: gradient clipping by norm, or None.

    Returns:
        ``steps`` step times in seconds.

    Raises:
        RuntimeError: the batches run out before ``warmup + steps + 1``.
    """
    optimizer, scheduler, interval = _optimizer_and_scheduler(model)
    model.train()
    stamps = []
    iterator = iter(batches)
    for i in range(warmup + steps + 1):
        batch = next(iterator, None)
        if batch is None:
            raise RuntimeError(f"perf train: the loader ran out after {i} batches; warmup + steps + 1 = "
                               f"{warmup + steps + 1} are needed (lower --steps or --warmup).")
        batch = move_data_to_device(batch, device)
        sync_device(device)  # the same point as StepClock's stamp: batch fetched and on the device
        stamps.append(time.perf_counter())
        if i == warmup + steps:  # the closing stamp of the last step: no step after it
            break
        optimizer.zero_grad(set_to_none=True)  # before the backward, as Lightning does (a fit leaves its last grads)
        with precision_context():
            loss = model.training_loss(batch)["loss"]
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        if scheduler is not None and interval == "step":
            scheduler.step()
    return step_times(stamps, warmup)


def clip_norm(trainer: L.Trainer) -> float | None:
    """The trainer's gradient clipping by norm (the recipes' ``gradient_clip_val``), or None.

    Raises:
        ValueError: clipping by value, which the bare loop does not reproduce.
    """
    if trainer.gradient_clip_algorithm not in (None, "norm"):
        raise ValueError(f"perf train: gradient_clip_algorithm {trainer.gradient_clip_algorithm!r} is not timed; use 'norm'.")
    return float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None


def _cli_args(method: str, args: argparse.Namespace, run_dir: Path, extra: list[str]) -> list[str]:
    """The ``fit`` arguments of one measured run: the method's recipe on the embedded synthetic
    data, one epoch of exactly the batches both loops need, no validation, random weights; then
    ``--tiny``'s settings, ``--real-batch``'s batch composition and the user's own options (last,
    so that they win)."""
    total = args.warmup + args.steps + 1
    # Random weights: a step costs the same with any values, and nothing is downloaded.
    out = ["--method", method, "--data", "synthetic", "--run_dir", str(run_dir), "--logger", args.logger,
           "--backbone.pretrained", "false",
           "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(total), "--trainer.limit_val_batches", "0",
           "--trainer.num_sanity_val_steps", "0",
           # Exactly the batches both loops need, whatever epoch length the recipe sets.
           "--data.batches_per_epoch", str(total)]
    if args.tiny:
        out += TINY
    if args.real_batch:
        out += real_batch_args(method, args.real_batch)
    return out + extra


def real_batch_args(method: str, dataset: str) -> list[str]:
    """``--data.classes_per_batch`` / ``--data.samples_per_class`` of ``configs/<method>/<dataset>.yaml``.

    The batch composition of a real dataset's recipe applied to the synthetic data: the step's
    cost at the batch size the paper trains with. Empty when the method has no recipe for it.
    """
    path = recipe_dir() / method / f"{dataset}.yaml"
    if not path.is_file():
        return []
    data = (yaml.safe_load(path.read_text()) or {}).get("data", {}) or {}
    init = data.get("init_args", data) or {}
    return [f"--data.{k}={init[k]}" for k in ("classes_per_batch", "samples_per_class") if k in init]


class InMemoryBatches:
    """Batches held in memory as one loader (Lightning would read a plain list as several loaders).

    An iterable with a length: Lightning counts its batches as it counts a DataLoader's.
    """

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _in_memory(datamodule: Any, count: int) -> list[Any]:
    """The first ``count`` training batches of the datamodule, held in memory (CPU).

    Kept on the CPU, as a loader yields them: both loops still move each batch to the device, so
    the memory source removes loading and decoding from the step, not the transfer.
    """
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def measure(method: str, source: str, args: argparse.Namespace, extra: list[str], scratch: Path) -> Result:
    """Both loops for one method and batch source (and a profiled fit with ``--profile``).

    One run is built and reused for every round: the same model, trainer, data and precision for
    both loops. The bare loop runs on the model as the fit left it (on its device, with the state
    its hooks built).

    Args:
        method: a registered method.
        source: ``embedded`` (the datamodule's loader) or ``memory`` (the same batches in memory).
        args: this command's options.
        extra: options passed on to the run builder.
        scratch: the folder of the scratch runs.

    Returns:
        The step times of both loops over every round, and the profile with ``--profile``.
    """
    run_dir = scratch / f"{method}-{source}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = build_cli("fit", _cli_args(method, args, run_dir, extra), run=False)
        note = ""
        # A backbone the user chose is kept; otherwise a method that trains on cached embeddings gets
        # the tiny encoder (BANK_ENCODER), rebuilt with it.
        chosen = any(a == "--backbone" or a.startswith("--backbone=") for a in extra)
        if _trains_without_images(cli.model) and not args.tiny and not chosen:
            extra = extra + bank_encoder_args(cli.model)
            note = "no images in the step: bank embedded with a tiny encoder"
            cli = build_cli("fit", _cli_args(method, args, run_dir, extra), run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    clock = StepClock()
    trainer.callbacks.append(clock)
    total = args.warmup + args.steps + 1
    batches: list[Any] | None = None
    if source == "memory":
        # The batches the fit would read, taken once (with the method's data request applied), and the
        # datamodule's loader replaced by them: both loops then read the very same tensors.
        datamodule.prepare_data()
        datamodule.setup("fit")
        if hasattr(model, "data_request") and hasattr(datamodule, "apply_request"):
            datamodule.apply_request(model.data_request())
        batches = _in_memory(datamodule, total)
        datamodule.train_dataloader = lambda: InMemoryBatches(batches)  # type: ignore[method-assign]
    device, result = None, None  # known after the first fit: the strategy has moved the model then
    loader = batches if batches is not None else None
    def bare() -> None:  # the bare loop, appending to result.bare
        result.bare += bare_loop(model, loader if loader is not None else datamodule.train_dataloader(), args.steps,
                                 args.warmup, device, trainer.precision_plugin.forward_context, clip_norm(trainer))

    for round_ in range(max(1, args.rounds)):
        # The rounds alternate the two loops in the order fit, bare | bare, fit | fit, bare ...
        # (one more fit epoch each time), so that a drift of the machine's speed, or whichever
        # loop runs second, favours neither.
        if round_ % 2 == 1:
            bare()
        clock.stamps = []
        # The same trainer fits once more: raising max_epochs by one runs one more epoch of
        # limit_train_batches batches, with no new trainer, callbacks or loggers to build.
        trainer.fit_loop.max_epochs = round_ + 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=datamodule)
        device = trainer.strategy.root_device
        model.to(device)
        if result is None:  # described once, from the first round's fit
            bs = _batch_size(batches[0] if batches else next(iter(datamodule.train_dataloader())))
            result = Result(method, source, bs, str(trainer.precision), torch.get_num_threads(), str(device), note=note,
                            trained_params=sum(p.numel() for opt in trainer.optimizers for group in opt.param_groups
                                               for p in group["params"]))
        framework = step_times(clock.stamps, args.warmup)
        if len(framework) < args.steps:  # the fit ran fewer batches than asked: say so beside the numbers
            result.note = "; ".join(filter(None, [note, f"the fit ran {len(clock.stamps)} batches of {total}"]))
        result.framework += framework
        if round_ % 2 == 0:
            bare()
    if args.profile:
        result.profile = profile_actions(method, source, args, extra, scratch, batches)
    return result


def bank_encoder_args(model: L.LightningModule) -> list[str]:
    """Arguments that swap the encoder for :data:`BANK_ENCODER`, keeping ``model``'s embedding
    size, which sizes what the step trains (Context-Refine's refiner)."""
    return [*BANK_ENCODER, "--model.embedding_dim", str(model.embedding_dim)]


def _trains_without_images(model: L.LightningModule) -> bool:
    """Whether the method's training batches carry no images (its ``DataRequest``)."""
    request = getattr(model, "data_request", None)
    return request is not None and not request().load_images


def _batch_size(batch: Any) -> int:
    """Samples in a batch (its labels), 0 for a batch without labels."""
    return len(batch["label"]) if isinstance(batch, dict) and "label" in batch else 0


# Actions of Lightning's SimpleProfiler that contain the method's own work (forward, backward,
# optimizer) or nest other actions: left out of the framework's list.
_COMPUTE = ("training_step", "backward", "optimizer_step", "run_training_batch", "run_training_epoch",
            "_TrainingEpochLoop", "_FitLoop", "[Strategy]")
# Framework actions the bare loop does as well (moving the batch, zeroing the gradients, clipping).
SHARED = ("transfer_batch_to_device", "optimizer_zero_grad", "configure_gradient_clipping")
# The profile row of the method's self.log calls, timed by profile_actions itself.
LOG_ACTION = "[LightningModule]self.log (inside training_step)"


def profile_actions(method: str, source: str, args: argparse.Namespace, extra: list[str], scratch: Path,
                    batches: list[Any] | None) -> list[tuple[str, float]]:
    """One more fit under Lightning's SimpleProfiler: the framework's actions, seconds per step,
    largest first. ``self.log`` calls are timed too (they run inside the method's training step,
    which the profiler counts as one action with the method's compute).

    A separate fit, not one of the timed ones: the profiler's own bookkeeping costs time.

    Args:
        method, source, args, extra, scratch: as for :func:`measure`.
        batches: the in-memory batches for the ``memory`` source, else None.

    Returns:
        ``(action, seconds per step)``, largest first. Actions that ran fewer than half as often as
        the steps (once per fit or per epoch) are left out; costs are spread over every step,
        warm-up included.
    """
    from lightning.pytorch.profilers import SimpleProfiler

    run_dir = scratch / f"{method}-{source}-profile"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The profiler's summary goes to a file in the scratch run, not to the terminal.
        profiler = ["--trainer.profiler.class_path", "lightning.pytorch.profilers.SimpleProfiler",
                    "--trainer.profiler.init_args.dirpath", str(run_dir),
                    "--trainer.profiler.init_args.filename", "profile"]
        cli = build_cli("fit", _cli_args(method, args, run_dir, extra) + profiler, run=False)
        if batches is not None:
            cli.datamodule.train_dataloader = lambda: InMemoryBatches(batches)  # type: ignore[method-assign]
        model, log_seconds = cli.model, [0.0]
        log = model.log

        def timed_log(*a: Any, **kw: Any) -> None:
            """``model.log`` with its time added to the training steps' total."""
            start = time.perf_counter()
            try:
                log(*a, **kw)
            finally:
                # Only during training: the evaluation's logging is not part of a step.
                if model._trainer is not None and model.trainer.training:
                    log_seconds[0] += time.perf_counter() - start

        model.log = timed_log  # type: ignore[method-assign]
        cli.trainer.fit(model, datamodule=cli.datamodule)
    profiler = cli.trainer.profiler
    steps = max(1, args.warmup + args.steps + 1)
    rows = [(LOG_ACTION, log_seconds[0] / steps)]
    if isinstance(profiler, SimpleProfiler):
        for action, durations in profiler.recorded_durations.items():
            # Hooks (on_*) are the framework's even when their names contain a compute action's.
            if any(key in action for key in _COMPUTE) and "on_" not in action:
                continue
            if len(durations) < steps // 2:  # once per fit or per epoch: not a per-step cost
                continue
            rows.append((action, sum(durations) / steps))
    return sorted(rows, key=lambda r: -r[1])


def own_seconds(profile: list[tuple[str, float]]) -> float:
    """Seconds per step of the framework's own actions (those the bare loop does not do)."""
    return sum(seconds for action, seconds in profile if not any(key in action for key in SHARED))


# ---------------------------------------------------------------------------- the command
def _methods(requested: str | None) -> list[str]:
    """The methods to measure: ``--methods`` (comma-separated), or every registered one, sorted.

    Raises:
        UnknownNameError: an unknown name (exit 2, with the registered names).
    """
    registry.discover()
    known = sorted(registry.METHODS)
    if not requested:
        return known
    names = [m.strip() for m in requested.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown:
        raise UnknownNameError(f"perf train: unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}.")
    return names


def print_report(results: list[Result], args: argparse.Namespace, argv: list[str]) -> None:
    """The console report: machine and settings, one row per method and source (median step
    times, measured and attributed overhead against the goal, img/s), then the notes and the
    largest framework actions of each profiled fit."""
    from rich.table import Table

    console = make_console()
    # The goal depends on the batch size: a framework's fixed cost per step weighs less on a larger step.
    target = TARGET_REAL if args.real_batch else TARGET_EMBEDDED
    console.print(f"[bold]python -m benchmark perf train[/bold] {' '.join(argv)}".rstrip(), highlight=False)
    cpu = cpu_name()
    console.print(f"{cpu}; torch {torch.__version__}, lightning {L.__version__}; {args.steps} steps after "
                  f"{args.warmup} warm-up; goal: overhead <= {100 * target:.0f} %", highlight=False)
    table = Table(show_lines=False)
    for col in ("method", "source", "batch", "precision", "bare ms/step", "framework ms/step", "measured",
                "framework own ms/step", "attributed", "img/s"):
        table.add_column(col, justify="left" if col in ("method", "source", "precision") else "right")

    def pct(value: float) -> str:
        """An overhead in percent, green within the goal and red above it; ``-`` for NaN."""
        if value != value:
            return "-"
        return f"[{'green' if value <= target else 'red'}]{100 * value:+.1f} %[/]"

    for r in results:
        table.add_row(r.method, r.source, str(r.batch_size), r.precision,
                      f"{1e3 * statistics.median(r.bare):.1f}" if r.bare else "-",
                      f"{1e3 * statistics.median(r.framework):.1f}" if r.framework else "-",
                      pct(r.overhead), f"{1e3 * own_seconds(r.profile):.2f}" if r.profile else "-", pct(r.attributed),
                      f"{r.images_per_second:,.0f}")
    console.print(table)
    console.print("step times are medians; measured = framework / bare mean step time - 1 (both loops timed, "
                  "noisy on a shared CPU); attributed = the framework's own actions per step (profiled fit: "
                  "hooks, self.log, callbacks; not the moving, zeroing and clipping the bare loop does too) / "
                  "the bare median step", highlight=False)
    for r in results:
        if r.note:
            console.print(f"{r.method} ({r.source}): {r.note}", highlight=False)
        if r.profile:
            parts = ", ".join(f"{name} {1e3 * s:.2f} ms" for name, s in r.profile[:8])
            console.print(f"{r.method} ({r.source}) framework actions per step: {parts}", highlight=False)


def cpu_name() -> str:
    """The CPU's model, whether it has AVX-512 and torch's threads, for a report's header (Linux:
    ``/proc/cpuinfo``). Step times on a CPU depend on all three (bf16 is native only with
    AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "CPU: unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")
    avx512 = "avx512" in text
    return f"CPU: {name} ({'AVX-512' if avx512 else 'no AVX-512'}), {torch.get_num_threads()} threads"


@register_perf("train", "framework overhead per training step vs a bare PyTorch loop, per method")
def main(argv: list[str] | None = None) -> int:
    """``perf train``: both loops for every method and source, the report, the headlines, the JSON.

    Args:
        argv: this command's options (``--help``; the module docstring explains the method);
            unknown options go to the run builder of every measured run.

    Returns:
        0; the overheads are judged in the report and by ``perf gpu`` through the headlines.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmark perf train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=None, help="comma-separated; default every registered method")
    parser.add_argument("--sources", default=",".join(SOURCES), help="embedded, memory or both (comma-separated)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (in every round)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of fit and bare loop (drift reaches both)")
    parser.add_argument("--real-batch", default=None, metavar="DATASET",
                        help="use the batch size of each method's recipe for DATASET (e.g. cub)")
    parser.add_argument("--logger", default="csv", help="the fit's logger (csv, wandb, none); default csv")
    parser.add_argument("--profile", action="store_true", help="one more profiled fit per method: where the time goes")
    parser.add_argument("--tiny", action="store_true", help="tiny encoder and images, 3 steps: the CI path")
    parser.add_argument("--goal-img-s", type=float, default=0.0, help="goal for training images/s (perf gpu)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    args, extra = parser.parse_known_args(argv)
    # --tiny's own step counts unless given: seconds on a CPU, enough for a step time.
    if args.tiny and "--steps" not in (argv or []):
        args.steps, args.warmup = 3, 1
    if args.tiny and "--rounds" not in (argv or []):
        args.rounds = 1
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        parser.error(f"--sources: unknown {', '.join(bad)}; choose from {', '.join(SOURCES)}")
    results = []
    # The scratch runs (folders, checkpoints, logs) exist only for the measurement.
    with tempfile.TemporaryDirectory(prefix="perf-train-") as scratch:
        for method in _methods(args.methods):
            for source in sources:
                print(f"[perf train] {method} ({source})", file=sys.stderr)
                results.append(measure(method, source, args, extra, Path(scratch)))
    print_report(results, args, list(argv or []))
    target = TARGET_REAL if args.real_batch else TARGET_EMBEDDED
    for r in results:
        where = f"{r.method}, {r.source}, batch {r.batch_size}, {r.precision}, {r.device}"
        # --goal-img-s is set by perf gpu's checks for their GPU sizes; 0 means no goal.
        perf_headline(f"training img/s ({where})", r.images_per_second, "img/s", args.goal_img_s or None)
        # The profiled (attributed) overhead when there is one: it does not depend on the noise of two
        # separately timed loops; else the measured one.
        attributed = r.attributed == r.attributed
        perf_headline(f"framework overhead, {'attributed' if attributed else 'measured'} ({where})",
                      100 * (r.attributed if attributed else r.overhead), "%", 100 * target, higher_is_better=False)
    if args.out is not None:
        payload = {"command": "perf train", "argv": list(argv or []), "cpu": cpu_name(), "torch": torch.__version__,
                   "lightning": L.__version__, "steps": args.steps, "warmup": args.warmup,
                   "target": TARGET_REAL if args.real_batch else TARGET_EMBEDDED,
                   "results": [r.as_dict() for r in results]}
        atomic_write_text(args.out, json.dumps(payload, indent=1) + "\n")
    return 0
