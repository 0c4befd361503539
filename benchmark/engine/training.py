"""What every training run shares beyond Lightning's defaults.

* :func:`resolve_precision`: ``precision="auto"`` picks bfloat16 mixed precision only where
  the hardware runs it natively (CUDA devices with bf16; CPUs with AVX512-BF16 or AMX) and
  float32 otherwise. On a CPU without native bfloat16 (AVX2 only: most laptops and many
  cloud VMs) autocast emulates bfloat16 and a ViT step is about 8x slower than in float32.
* :class:`BenchmarkTrainer`: a ``lightning.Trainer`` whose ``precision`` accepts ``"auto"``
  (the default), so that recipes and ``--trainer.precision`` share one vocabulary.
* :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file beside the
  target and renamed into place, so a run killed while saving never leaves a truncated
  ``last.ckpt`` (Lightning's own writer stages the file in the system's temp folder and
  *copies* it when that is another file system).
* :class:`RunStatus`: ``<run_dir>/status.json`` says whether a run is running, completed,
  interrupted or failed, with the exit code and the reason; SIGINT (Ctrl-C) and SIGTERM
  stop training at the end of the current step, write ``last.ckpt`` and exit with 130 and
  143 as shells report them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from benchmark.core.errors import EXIT_SIGINT, EXIT_SIGTERM
from benchmark.core.io import atomic_path, atomic_write_text
from benchmark.core.validation import check_all

PrecisionInput = _PRECISION_INPUT | Literal["auto"]




# ---------------------------------------------------------------------------- precision
def _cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux); empty elsewhere."""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
        match = re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)
        if match:
            return set(match.group(1).split())
    return set()


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), and what it has.

    torch's own probes are private (``torch.cpu._is_avx512_bf16_supported``), so they are
    used when present and /proc/cpuinfo is read otherwise.
    """
    probes = {
        "AMX": getattr(torch.cpu, "_is_amx_tile_supported", None),
        "AVX512-BF16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
    }
    for name, probe in probes.items():
        with contextlib.suppress(Exception):
            if probe is not None and probe():
                return True, name
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return True, "AMX"
    if "avx512_bf16" in flags:
        return True, "AVX512-BF16"
    with contextlib.suppress(Exception):
        return False, str(torch.backends.cpu.get_cpu_capability())  # e.g. AVX2, AVX512
    return False, "no bfloat16 instructions"


def cuda_native_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(precision: Any, accelerator: Any = "auto") -> tuple[Any, str]:
    """Lightning's precision for ``precision`` (``"auto"`` resolved) and the reason, in words.

    ``auto``: ``bf16-mixed`` on a CUDA device with bfloat16 or a CPU with AVX512-BF16/AMX,
    ``32-true`` otherwise; never fp16 (its overflow needs loss scaling that some losses
    here do not tolerate). Any other value is returned unchanged.
    """
    if precision not in ("auto", None):
        return precision, "set explicitly"
    name = str(getattr(accelerator, "__class__", type(None)).__name__) if not isinstance(accelerator, str) else accelerator
    name = name.lower()
    on_cuda = ("cuda" in name or name in ("gpu", "auto")) and torch.cuda.is_available()
    if on_cuda:
        if cuda_native_bf16():
            return "bf16-mixed", f"auto: {torch.cuda.get_device_name()} supports bfloat16"
        return "32-true", f"auto: {torch.cuda.get_device_name()} has no bfloat16"
    if "mps" in name:
        return "32-true", "auto: float32 on Apple MPS"
    native, what = cpu_native_bf16()
    if native:
        return "bf16-mixed", f"auto: the CPU computes bfloat16 natively ({what})"
    return "32-true", f"auto: the CPU has no native bfloat16 ({what}; emulated bfloat16 is ~8x slower than float32)"


class _DropLitLoggerTip(logging.Filter):
    """Lightning 2.6 logs an advertisement for its cloud logger ("Tip: ... try installing litlogger")
    whenever a Trainer is built without it: on every run of this benchmark, which chooses its loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def _quiet_library_messages() -> None:
    """Install the filter on the logger Lightning's rank-zero messages go through (once), and the
    warning filters for messages about the library stack rather than the user's run; installed when
    a trainer is built, never at import (a library module leaves the process's filters alone)."""
    source = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitLoggerTip) for f in source.filters):
        source.addFilter(_DropLitLoggerTip())
    # Lightning 2.6 calls a torch pytree API that torch deprecated (lightning/pytorch/utilities/_pytree.py).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")



class BenchmarkTrainer(L.Trainer):
    """``lightning.Trainer`` with ``precision="auto"`` (the default): see :func:`resolve_precision`.

    The requested and resolved precision and the reason are kept in
    :attr:`precision_choice` and recorded in every results file.
    """

    def __init__(self, *args: Any, precision: PrecisionInput | None = "auto", **kwargs: Any) -> None:
        _quiet_library_messages()
        resolved, reason = resolve_precision(precision, kwargs.get("accelerator", "auto"))
        self.precision_choice = {"requested": str(precision), "precision": str(resolved), "reason": reason}
        super().__init__(*args, precision=resolved, **kwargs)


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class CheckpointSettings:
    """The run's checkpoints (``checkpoint:`` in a recipe, ``--checkpoint.*`` on the command line).

    Args:
        save_top_k: best checkpoints kept by the selection metric (0: none, -1: every one).
        monitor: the metric that selects them; default the method's ``selection_metric``
            (``val/R@1``; Context-Refine ``val/refined/R@1``), which the holdout test also uses.
        mode: ``max`` or ``min`` for ``monitor``; default the method's.
        last_every_n_epochs: write ``last.ckpt`` every n training epochs (0: only on interruption).
    """

    save_top_k: int = 1
    monitor: str | None = None
    mode: Literal["max", "min"] | None = None
    last_every_n_epochs: int = 1

    def __post_init__(self) -> None:
        check_all([("checkpoint.save_top_k", self.save_top_k, self.save_top_k >= -1, ">= -1"),
                   ("checkpoint.last_every_n_epochs", self.last_every_n_epochs, self.last_every_n_epochs >= 0, ">= 0")])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written beside their target and renamed into place (atomic on POSIX)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = str(path)
        if "://" in target and not target.startswith("file://"):  # remote storage: Lightning's writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(target.removeprefix("file://")) as tmp:
            torch.save(checkpoint, tmp)


# ---------------------------------------------------------------------------- run status
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


#: Set by ``python -m benchmark`` to the time it started (seconds since the epoch).
ENV_STARTED = "DML_BENCHMARK_STARTED"


class RunStatus(Callback):
    """The run's state in ``<run_dir>/status.json`` and graceful stops on SIGINT/SIGTERM.

    States: ``running`` (written when the run starts), ``completed`` (exit 0),
    ``interrupted`` (SIGINT: 130, SIGTERM: 143) and ``failed`` (an exception: exit 1, or 2
    for a user error), each with the exit code and a one-line reason.

    Signals: the first SIGINT (Ctrl-C) or SIGTERM asks Lightning to stop at the end of the
    current training step (Lightning's own SIGTERM path, which also stops the other DDP
    ranks); the callback then writes ``checkpoints/last.ckpt`` atomically, so that
    ``fit --ckpt_path <run>/checkpoints/last.ckpt`` continues with the same global step
    and optimizer state. A second Ctrl-C aborts at once without a checkpoint (the last good
    ``last.ckpt`` stays). Outside a trainer call (start-up, data preparation) a signal ends
    the run at once with the same status and exit code.
    """

    def __init__(self, command: str = "fit") -> None:
        super().__init__()
        self.command = command
        self.run_dir: Path | None = None
        self.signal: int | None = None
        self.checkpoint: Path | None = None
        self.started = _now()
        self.created_run_dir = False
        self.state = ""  # the last status written
        self.exit_code: int | None = None  # and its exit code
        self.note = ""  # a remark for the final status (e.g. training cut short by max_time)
        self._previous: dict[int, Any] = {}
        # When the process started (set by `python -m benchmark`; else now): the start-up to the first
        # training step (imports, data, model, the evaluation before training) is recorded in status.json.
        self.process_started = float(os.environ.get(ENV_STARTED) or time.time())
        self.first_step_s: float | None = None

    # ------------------------------------------------------------------ status file
    @property
    def path(self) -> Path | None:
        return self.run_dir / "status.json" if self.run_dir is not None else None

    @property
    def is_rank_zero(self) -> bool:
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0

    def write(self, status: str, exit_code: int | None = None, reason: str = "") -> None:
        """Write the status file (global rank 0 only; DDP workers leave it alone)."""
        self.exit_code = exit_code
        if self.path is None:
            return
        self.state = status
        if not self.is_rank_zero:
            return
        payload = {
            "status": status,
            "command": self.command,
            "exit_code": exit_code,
            "reason": reason or self.note,
            "started": self.started,
            "updated": _now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "argv": sys.argv,
        }
        if self.checkpoint is not None:
            payload["checkpoint"] = str(self.checkpoint)
        if self.first_step_s is not None:
            payload["first_step_s"] = self.first_step_s
        atomic_write_text(self.path, json.dumps(payload, indent=2) + "\n")

    def discard_unused_run_dir(self) -> None:
        """Remove the run folder this process created if nothing of value was written to it.

        Of value: checkpoints and metrics files. A run that failed at start-up on a user
        error (an option, a file, the data) leaves no half-written folder behind.
        """
        run = self.run_dir
        if run is None or not self.created_run_dir or not run.is_dir():
            return
        if any(run.glob("checkpoints/*.ckpt")) or any(run.glob("metrics_*.json")):
            return
        shutil.rmtree(run, ignore_errors=True)
        self.run_dir = None

    def start(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.write("running")

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        """Route SIGINT and SIGTERM through :meth:`_on_signal` (main thread only)."""
        with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore_signal_handlers(self) -> None:
        with contextlib.suppress(ValueError):
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Record the first signal; stop gracefully inside a trainer call, at once outside it."""
        first = self.signal is None
        if first:
            self.signal = signum
        if signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is not self._on_signal:
            return  # called by Lightning's SIGTERM handler, which stops after the current step
        if signum == signal.SIGINT and first:
            lightning_handler = signal.getsignal(signal.SIGTERM)
            if callable(lightning_handler) and lightning_handler is not self._on_signal:
                print(
                    "\n[benchmark] Ctrl-C: stopping after the current step and saving last.ckpt "
                    "(press Ctrl-C again to abort at once).",
                    file=sys.stderr,
                    flush=True,
                )
                lightning_handler(signal.SIGTERM, frame)  # Lightning stops at its next safe point
                return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SIGTERMException()

    def exit_code_for_signal(self) -> int | None:
        if self.signal == signal.SIGINT:
            return EXIT_SIGINT
        if self.signal == signal.SIGTERM:
            return EXIT_SIGTERM
        return None

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """After the first training step of this process: say how long start-up took, and record it."""
        if self.first_step_s is not None:
            return
        self.first_step_s = round(time.time() - self.process_started, 2)
        if trainer.is_global_zero:
            print(f"[benchmark] first training step {self.first_step_s:.1f} s after start (imports, data, model, "
                  "the evaluation before training)", file=sys.stderr)  # fmt: skip
            if self.state == "running":
                self.write("running")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """At a graceful stop during fit, write last.ckpt (the step is complete)."""
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return  # a failure or a hard abort: the last good last.ckpt stays as it is
        if self.signal is None:
            self.signal = signal.SIGTERM
        checkpoints = [c for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        folder = Path(checkpoints[0].dirpath) if checkpoints else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path)  # a collective under DDP; AtomicCheckpointIO renames into place
        self.checkpoint = path


VERSIONED_PACKAGES = ("dml-benchmark", "torch", "torchvision", "lightning", "timm", "pytorch-metric-learning",
                      "faiss-cpu", "wandb")


def run_metadata(run_info: dict[str, Any], trainer_cfg: dict[str, Any], datamodule: Any) -> dict[str, Any]:
    """What else makes a run's numbers reproducible and comparable, as flat keys: the recipe (name
    and content hash), the training length, the augmentation and the library versions."""
    import hashlib
    from dataclasses import asdict, is_dataclass
    from importlib.metadata import PackageNotFoundError, version

    meta: dict[str, Any] = {}
    recipe = run_info.get("recipe")
    meta["recipe"] = str(recipe) if recipe else None
    if recipe and Path(str(recipe)).is_file():
        meta["recipe_sha256"] = hashlib.sha256(Path(str(recipe)).read_bytes()).hexdigest()[:16]
    for key in ("max_epochs", "max_steps", "accumulate_grad_batches"):
        if trainer_cfg.get(key) is not None:
            meta[key] = trainer_cfg[key]
    augment = getattr(datamodule, "augment", None)
    if is_dataclass(augment):
        meta.update({f"augment.{k}": list(v) if isinstance(v, tuple) else v for k, v in asdict(augment).items()})
    for package in VERSIONED_PACKAGES:
        try:
            meta[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            continue
    return meta


# ---------------------------------------------------------------------------- what a run records
CONFIG_KEY = "benchmark_config"  # the run's resolved configuration (YAML) inside every checkpoint


class ConfigInCheckpoint(Callback):
    """Stores the run's resolved configuration (the YAML of ``config.yaml``) in every checkpoint, so that
    ``test --ckpt_path`` evaluates a checkpoint with the settings it was trained with even when its run
    folder is gone, and can refuse a ``--config`` that does not match them."""

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config_yaml


def optimizer_steps_per_epoch(trainer: L.Trainer, datamodule: Any) -> int | None:
    """Optimizer steps in one training epoch: the trainer's batch count (limits applied) when it has
    loaded the training data, else the datamodule's batch sampler, over gradient accumulation."""
    batches = trainer.num_training_batches
    if not isinstance(batches, int) or batches <= 0:
        sampler = getattr(datamodule, "training_batches", None)
        try:
            batches = len(sampler()) if callable(sampler) else None
        except Exception:  # a datamodule that cannot say before its data is set up
            batches = None
        if batches and isinstance(trainer.limit_train_batches, int):
            batches = min(batches, trainer.limit_train_batches)
    if not batches:
        return None
    accumulate = max(1, int(trainer.accumulate_grad_batches or 1))
    return -(-int(batches) // accumulate)


def _planned_steps(max_epochs: Any, max_steps: Any, per_epoch: int | None) -> int | None:
    """Lightning's rule: training stops at whichever of max_steps / max_epochs comes first."""
    limits = []
    if isinstance(max_steps, int) and max_steps >= 0:
        limits.append(max_steps)
    if isinstance(max_epochs, int) and max_epochs >= 0 and per_epoch:
        limits.append(max_epochs * per_epoch)
    return min(limits) if limits else None


def training_length(trainer: L.Trainer, datamodule: Any, recipe: Path | None, stopped_by: str = "") -> dict[str, Any]:
    """How long the run trained against what it and its recipe asked for, as flat result keys.

    ``steps_trained`` (optimizer steps, the trainer's global step), ``steps_planned`` (this run's
    ``max_epochs`` / ``max_steps``), ``steps_recipe`` (the recipe's, when it sets a length) and
    ``short``: a one-line reason when the run trained fewer steps than either (``max_time``,
    ``--trainer.max_epochs 0`` ...), else ``""``. The leaderboard groups by ``steps_trained`` and marks
    short runs, so a cut-short run is never averaged with complete ones.
    """
    per_epoch = optimizer_steps_per_epoch(trainer, datamodule)
    trained = int(trainer.global_step)
    planned = _planned_steps(trainer.max_epochs, trainer.max_steps if trainer.max_steps != -1 else None, per_epoch)
    recipe_steps = None
    if recipe is not None and Path(recipe).is_file():
        import yaml

        with contextlib.suppress(Exception):
            section = (yaml.safe_load(Path(recipe).read_text()) or {}).get("trainer") or {}
            if "max_epochs" in section or "max_steps" in section:
                recipe_steps = _planned_steps(section.get("max_epochs"), section.get("max_steps"), per_epoch)
    short = ""
    if trained == 0:
        short = "trained 0 steps: the weights are the initial ones"
    elif planned is not None and trained < planned:
        short = f"trained {trained} of {planned} planned steps" + (f" ({stopped_by})" if stopped_by else "")
    elif recipe_steps is not None and trained < recipe_steps:
        short = f"trained {trained} steps; the recipe trains {recipe_steps}"
    return {"steps_trained": trained, "steps_planned": planned, "steps_recipe": recipe_steps,
            "steps_per_epoch": per_epoch, "short": short}  # fmt: skip


def truncate_records(run_dir: Path, step: int) -> list[str]:
    """Drop the evaluations recorded after ``step`` from a run's ``metrics_*.json`` (a resume from a
    checkpoint at ``step``: what came later belonged to weights that are lost, e.g. a validation whose
    checkpoint a ``kill -9`` never wrote). Returns one line per file changed."""
    changed = []
    for path in sorted(Path(run_dir).glob("metrics_*.json")):
        try:
            data = json.loads(path.read_text())
            evaluations = data["evaluations"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a record of ours: the evaluation callback will say so if it matters
        kept = [e for e in evaluations if int(e.get("global_step") or 0) <= step]
        if len(kept) == len(evaluations):
            continue
        data["evaluations"] = kept
        if kept:
            data["metrics"] = kept[-1].get("metrics", {})
        atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
        changed.append(f"{path.name}: dropped {len(evaluations) - len(kept)} evaluation(s) after step {step}")
    return changed
