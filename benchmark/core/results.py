"""What counts as a result: the one reading of a run directory's records that every reporter shares.

The evaluation callback writes ``metrics_val.json`` / ``metrics_test.json`` and the command line
``status.json``; the leaderboard, ``python -m benchmark status``, the suites, the figures and the
W&B report all read them through this module, so they cannot disagree on

* **the run's state** (:func:`run_state`): ``completed``, ``running``, ``interrupted``, ``failed``,
  or ``killed`` (the status says running but its process is gone: a ``kill -9``, a lost node);
* **the final number** (:func:`final_evaluation`): the test evaluation ``fit`` made at the end of
  training (under the holdout protocol of the checkpoint selected on the holdout split), never a
  later ``test --ckpt_path`` of some other checkpoint;
* **test-selected numbers** (:func:`test_selected_evaluations`): evaluations of weights chosen by
  a metric measured on the test split (the best validation under the paper protocol, where
  validation *is* the test split). Some papers report them; they are optimistic and always
  labelled so;
* **the best validation** (:func:`best_validation`): the best evaluation *after training started*
  by the run's selection metric (the pre-fit evaluation of the untrained model is a baseline,
  never "best"), the same one the checkpoint callback keeps;
* **epochs** (:func:`epochs_trained`): one convention everywhere: the number of training epochs
  completed when the evaluation ran (0 before training, 1 after the first epoch, fractions for
  evaluations inside an epoch);
* **comparability** (:func:`comparison_config`, :func:`comparison_key`): the run's whole resolved
  configuration minus seeds and bookkeeping, hashed; two runs are aggregated only when their keys
  and their numbers of trained steps agree.

A contract module: the standard library and :mod:`benchmark.core.io` only.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from benchmark.core.io import pid_alive

STATUS_FILE = "status.json"
#: The files that make a folder a run directory (any one of them).
RUN_RECORDS = ("config.yaml", "status.json", "metrics_val.json", "metrics_test.json")
STATES = ("completed", "running", "interrupted", "failed", "killed")

# ---------------------------------------------------------------------------- evaluation roles
ROLE_FINAL = "final"  # the end-of-training test that `fit` runs
ROLE_CHECKPOINT = "checkpoint"  # a later `test --ckpt_path` of a given checkpoint
SELECTED_ON_TEST = "test"  # chosen by a metric measured on the test split: optimistic
SELECTED_ON_HOLDOUT = "holdout"
OPTIMISTIC = "selected on test, optimistic"


class RecordError(ValueError):
    """A results file that cannot be read as one (not JSON, or not the shape the callback writes)."""


# ---------------------------------------------------------------------------- run state
@dataclass(frozen=True)
class RunState:
    """A run directory's state as ``status.json`` says, checked against its process."""

    state: str  # one of STATES, or "unknown" (no status.json: a run from before status files)
    exit_code: int | None = None
    reason: str = ""
    command: str = ""
    pid: int | None = None
    host: str = ""
    updated: str = ""

    @property
    def completed(self) -> bool:
        return self.state == "completed"


def run_state(run_dir: Path) -> RunState:
    """The state of ``run_dir``: its ``status.json``, with a ``running`` status checked against its
    process (same host: the pid must exist; a dead pid means the run was killed without a word)."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return RunState("unknown", reason="no status.json")
    try:
        status = json.loads(path.read_text())
        if not isinstance(status, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as err:
        return RunState("unknown", reason=f"unreadable status.json ({err})")
    state = str(status.get("status") or "unknown")
    pid = status.get("pid")
    pid = int(pid) if isinstance(pid, int) or (isinstance(pid, str) and pid.isdigit()) else None
    host = str(status.get("host") or "")
    common = {"command": str(status.get("command") or ""), "pid": pid, "host": host,
              "updated": str(status.get("updated") or "")}  # fmt: skip
    if state == "running" and host == socket.gethostname() and pid is not None and not pid_alive(pid):
        return RunState("killed", None, f"status says running, but its process (pid {pid} on {host}) is gone: "
                        "killed without saving (resume from checkpoints/last.ckpt if it exists)", **common)  # fmt: skip
    exit_code = status.get("exit_code")
    return RunState(state, exit_code if isinstance(exit_code, int) else None, str(status.get("reason") or ""), **common)


# ---------------------------------------------------------------------------- records
def read_record(path: Path) -> dict[str, Any]:
    """A ``metrics_<stage>.json`` as the callback writes it; :class:`RecordError` names what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise RecordError(f"{path}: cannot be read ({err.strerror or err})") from None
    except ValueError as err:
        raise RecordError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    evaluations = data.get("evaluations")
    if not isinstance(evaluations, list) or not all(isinstance(e, dict) for e in evaluations):
        raise RecordError(f"{path}: 'evaluations' must be a list of objects")
    for i, entry in enumerate(evaluations):
        metrics = entry.get("metrics")
        if not isinstance(metrics, dict):
            raise RecordError(f"{path}: evaluation {i} has no 'metrics' object")
        bad = [k for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
        if bad:
            raise RecordError(f"{path}: evaluation {i} has non-numeric metrics {bad[:3]}")
        refined = entry.get("refined", {})
        if not isinstance(refined, dict) or not all(isinstance(v, dict) for v in refined.values()):
            raise RecordError(f"{path}: evaluation {i} has a malformed 'refined' object")
    return data


def flat_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation entry -> ``{"R@1": .., "refined/R@1": .., "refined/level1/R@1": ..}``."""
    flat = {k: float(v) for k, v in (evaluation.get("metrics") or {}).items() if isinstance(v, (int, float))}
    for group, metrics in (evaluation.get("refined") or {}).items():
        for k, v in (metrics or {}).items():
            if isinstance(v, (int, float)):
                flat[f"{group}/{k}"] = float(v)
    return flat


def _legacy_final(entry: Mapping[str, Any]) -> bool:
    """A test entry written before roles were recorded: final when it evaluated the weights in memory
    at the end of training, or (holdout) the checkpoint selected on the holdout split."""
    checkpoint = entry.get("checkpoint") or {}
    return not checkpoint.get("path") or str(checkpoint.get("selected_by", "")).startswith("best")


def final_evaluation(test_record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The end-of-training test evaluation of a run (the last one ``fit`` made), or None."""
    evaluations = list(test_record.get("evaluations") or [])
    finals = [e for e in evaluations if e.get("role") == ROLE_FINAL]
    if finals:
        return finals[-1]
    legacy = [e for e in evaluations if "role" not in e and _legacy_final(e)]
    return legacy[-1] if legacy else None


def test_selected_evaluations(test_record: Mapping[str, Any] | None, val_record: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Evaluations on the test split of weights chosen by a test-split metric.

    The validations of a paper-protocol run (its validation split *is* the test split) after
    training started, and every test of a checkpoint that was selected on the test split.
    """
    out: list[dict[str, Any]] = []
    if val_record is not None and val_record.get("split") == "test":
        out += [e for e in val_record.get("evaluations") or [] if int(e.get("global_step") or 0) > 0]
    if test_record is not None:
        out += [e for e in test_record.get("evaluations") or [] if e.get("selected_on") == SELECTED_ON_TEST]
    return out


def selection_key(meta: Mapping[str, Any]) -> str:
    """The flat metric a run is selected by: its recorded ``selection_metric`` without ``val/``
    (``R@1``; Context-Refine ``refined/R@1``)."""
    return str(meta.get("selection_metric") or "val/R@1").removeprefix("val/")


def test_best(evaluations: Sequence[Mapping[str, float]], key: str, mode: str = "max") -> Mapping[str, float] | None:
    """Of flat test-selected evaluations, the one a paper's "best test epoch" means: the best by the
    run's selection metric ``key`` (ties to the earliest), whose other metrics are reported as they
    were at that evaluation (never each metric's own maximum over evaluations)."""
    best, best_value = None, None
    for metrics in evaluations:
        value = metrics.get(key)
        if value is None:
            continue
        if best_value is None or (value > best_value if mode == "max" else value < best_value):
            best, best_value = metrics, value
    return best


def best_validation(evaluations: Sequence[Mapping[str, Any]], metric: str, mode: str = "max") -> Mapping[str, Any] | None:
    """The best evaluation by ``metric`` (a flat name: ``R@1``, ``refined/R@1``) after training
    started (``global_step > 0``); ties keep the earliest, as the checkpoint callback does."""
    best, best_value = None, None
    for entry in evaluations:
        if int(entry.get("global_step") or 0) <= 0:
            continue
        value = flat_metrics(entry).get(metric)
        if value is None:
            continue
        if best_value is None or (value > best_value if mode == "max" else value < best_value):
            best, best_value = entry, value
    return best


def epochs_trained(entry: Mapping[str, Any]) -> float:
    """Training epochs completed when ``entry`` was evaluated (one convention for every figure, table
    and W&B chart): the recorded ``epochs_trained``, or for older records 0 before training and
    ``epoch + 1`` after it (validation runs at the end of the 0-based epoch ``epoch``). Older test
    entries: the test at the end of ``fit`` ran after the fit loop had counted every finished epoch
    (``epoch`` is already the number trained); a ``test --ckpt_path`` ran at step 0 of a fresh trainer,
    so its weights' epochs are the checkpoint's."""
    if isinstance(entry.get("epochs_trained"), (int, float)):
        return float(entry["epochs_trained"])
    if entry.get("stage") == "test":
        checkpoint = entry.get("checkpoint") or {}
        if checkpoint.get("path"):
            return epochs_trained({"global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")})
        return float(entry.get("epoch") or 0) if int(entry.get("global_step") or 0) > 0 else 0.0
    if int(entry.get("global_step") or 0) <= 0:
        return 0.0
    return float(entry.get("epoch") or 0) + 1.0


# ---------------------------------------------------------------------------- comparability
#: Options that never change a result: where files are, how fast or how verbosely it runs, what is
#: drawn or kept. Everything else in the resolved configuration is part of the comparison key.
BOOKKEEPING = frozenset({
    "seed_everything", "ckpt_path", "weights_only",
    "data.root", "data.num_workers", "data.verify_images", "data.eval_batch_size",
    "trainer.logger", "trainer.callbacks", "trainer.enable_checkpointing", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.default_root_dir", "trainer.profiler", "trainer.log_every_n_steps",
    "trainer.enable_autolog_hparams", "trainer.model_registry", "trainer.num_sanity_val_steps", "trainer.plugins",
    "trainer.max_time", "trainer.detect_anomaly", "trainer.barebones", "trainer.accelerator", "trainer.inference_mode",
    "evaluation.print_table", "evaluation.chunk_size", "evaluation.backend",
    "checkpoint.save_top_k", "checkpoint.last_every_n_epochs",
    "model.backbone.weights",  # a local path; the weights' content hash is recorded instead (weights_sha256)
})
#: Filled in from the data by the command line's links (the datamodule's values are recorded instead).
DERIVED = frozenset({"config", "model.num_classes", "model.image_size"})
#: Whole sections that are bookkeeping.
BOOKKEEPING_PREFIXES = ("figures.",)
#: Seeds: what a seed sweep varies. Never part of the key; each is recorded per run.
SEEDS = frozenset({"seed_everything", "data.seed"})


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A resolved LightningCLI config -> ``{"model.lr": .., "model.class_path": .., "data.image_size": ..}``.

    ``init_args`` levels are dropped from the names (``model.init_args.lr`` -> ``model.lr``);
    lists stay lists; every other value is a JSON scalar (else its ``str``).
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        key = str(key)
        if key.startswith("_") or key == "__path__":
            continue
        name = prefix if key == "init_args" else (f"{prefix}.{key}" if prefix else key)
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, name))
        elif isinstance(value, (list, tuple)):
            flat[name] = [v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for v in value]
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def comparison_config(config: Mapping[str, Any], per_run: Iterable[str] = ()) -> dict[str, Any]:
    """The settings that make two runs comparable: the flattened config minus bookkeeping, seeds and
    ``per_run`` options (a method's options whose values name one run's own inputs, e.g. a stage-1
    checkpoint path: their meaning is recorded by the method's ``describe()`` instead)."""
    flat = flatten_config(config) if any(isinstance(v, Mapping) for v in config.values()) else dict(config)
    drop = set(BOOKKEEPING) | set(SEEDS) | set(DERIVED) | {f"model.{name}" for name in per_run}
    return {k: v for k, v in sorted(flat.items()) if k not in drop and not k.startswith(BOOKKEEPING_PREFIXES)}


#: Recorded facts of a run that its configuration cannot carry: the precision ``auto`` resolved to on
#: this machine, the content of local weights, what a per-run input (a stage-1 checkpoint) was, and the
#: data actually found. Part of the comparison key next to :func:`comparison_config`.
IDENTITY_FIELDS = ("precision", "weights_sha256", "source_method", "dataset", "num_train_classes", "num_train_images",
                   "num_test_images")


def identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`IDENTITY_FIELDS` of a run's recorded metadata, as ``run.<field>`` keys."""
    return {f"run.{k}": meta[k] for k in IDENTITY_FIELDS if meta.get(k) is not None}


def comparison_key(settings: Mapping[str, Any]) -> str:
    """A short, stable hash of a comparison config (plus :func:`identity`); key order and the int/float
    spelling of whole numbers do not matter."""

    def canonical(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, (list, tuple)):
            return [canonical(v) for v in value]
        return value

    text = json.dumps({k: canonical(v) for k, v in sorted(settings.items())}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def comparison_group(key: str, steps_trained: Any) -> str:
    """The one field that names a leaderboard row: the comparison key and the steps trained (what W&B's
    charts group by, so that they pool exactly the runs the leaderboard pools)."""
    return f"{key}-{steps_trained}steps"
