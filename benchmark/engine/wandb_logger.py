"""W&B as the benchmark's default logger: a flat, filterable config, grouped runs, results as artifacts.

What a W&B user expects from a benchmark run, and what Lightning's ``WandbLogger`` alone does
not give:

* **Flat config keys** (``method``, ``dataset``, ``backbone``, ``seed``, ``protocol``,
  ``precision``, ``recipe``, batch composition, versions) that the run table filters and
  groups by. Lightning also logs every ``__init__`` argument of the model and datamodule
  (``save_hyperparameters``); with nested option groups those would overwrite the flat keys
  (``backbone`` becoming a dict, ``embedding_dim`` ``None``) and add ``_instantiator``.
  :class:`BenchmarkWandbLogger` puts them under ``hparams/`` (flattened with dots) instead.
* **Grouping and job type**: ``group`` = ``$WANDB_RUN_GROUP`` (a suite sets it) or
  ``dataset/method/backbone``; ``job_type`` = the command (``fit``, ``test``, ``validate``).
* **The summary** keeps the last value of every metric (W&B's rule); the number the run is
  judged by is added as ``best/<selection metric>``, ``best/epochs_trained`` and ``best/selected_on``
  (:class:`WandbResults`; test-selected under the paper protocol, and labelled so).
* **Artifacts**: the run's results JSON files after testing, and (opt-in, ``$DML_BENCHMARK_WANDB_CHECKPOINT=best``)
  its best checkpoint.
* **Credentials** are W&B's own: the API key, identity-token file or ``.netrc`` entry for the
  server W&B is configured for (``WANDB_BASE_URL`` / ``wandb login --host``), so a
  self-hosted server counts as logged in (:func:`wandb_logged_in`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from benchmark.core.results import (
    OPTIMISTIC,
    RecordError,
    best_validation,
    epochs_trained,
    flat_metrics,
    read_record,
)
from benchmark.engine.wandb_auth import wandb_logged_in

ENV_CHECKPOINT = "DML_BENCHMARK_WANDB_CHECKPOINT"
RESULT_FILES = ("metrics_val.json", "metrics_test.json", "status.json", "config.yaml")


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings and dataclass-like objects -> ``{"a.b.c": value}`` (private ``_`` keys dropped)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "__dataclass_fields__"):
            value = {f: getattr(value, f) for f in value.__dataclass_fields__}
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        elif isinstance(value, (list, tuple)):
            flat[name] = list(value) if all(isinstance(v, (int, float, str, bool)) for v in value) else str(value)
        elif value is None or isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class BenchmarkWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` whose automatic hyper-parameters go under ``hparams/``.

    The run's own flat metadata is the ``config`` given at construction; Lightning's
    ``log_hyperparams`` (the model's and datamodule's init arguments) no longer overwrites it.
    Lightning passes ``anonymous=None`` to ``wandb.init``, a setting W&B deprecated: any value
    other than "unset" prints "The anonymous setting has no effect" on every run, so it is not passed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    def log_hyperparams(self, params: Any) -> None:
        if not isinstance(params, Mapping):
            params = vars(params)
        super().log_hyperparams({f"hparams/{k}": v for k, v in flatten(params).items()})


def build_wandb_logger(run_dir: Path, meta: dict[str, Any], job_type: str) -> BenchmarkWandbLogger:
    """The run's W&B logger: online when logged in (else offline, synced later with ``wandb sync``);
    a resumed run (its ``wandb/`` folder exists) continues its W&B run id."""
    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    group = os.environ.get("WANDB_RUN_GROUP") or f"{meta.get('dataset')}/{meta.get('method')}/{meta.get('backbone')}"
    previous = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    resume = {"id": previous[-1].name.rsplit("-", 1)[1], "resume": "allow"} if previous else {}
    return BenchmarkWandbLogger(
        **resume,
        save_dir=str(run_dir),
        name=run_dir.name,
        project=os.environ.get("WANDB_PROJECT", "dml-benchmark"),
        group=group,
        job_type=job_type,
        tags=[str(meta.get("dataset")), str(meta.get("method")), str(meta.get("backbone"))],
        config=flatten(meta),
        mode=mode,
    )


class WandbResults(L.Callback):
    """Adds to the W&B run what a finished run is judged by: the best validation after ``fit``
    (``best/<selection metric>``, ``best/epochs_trained``, ``best/global_step`` and ``best/selected_on``:
    under the paper protocol validation runs on the test split, so that value is test-selected and
    optimistic, and says so), and (opt-in) the best checkpoint as a model artifact.

    "Best" is :func:`benchmark.core.results.best_validation` over the run's ``metrics_val.json``: the
    definition the figures and the leaderboard use (the untrained pre-fit evaluation is never best).
    """

    def __init__(self, run_dir: Path, selection_metric: str) -> None:
        self.run_dir, self.selection_metric = Path(run_dir), selection_metric

    @staticmethod
    def _logger(trainer: L.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        try:
            record = read_record(self.run_dir / "metrics_val.json")
        except RecordError:
            record = None
        callback = trainer.checkpoint_callback
        mode = getattr(callback, "mode", None) or getattr(pl_module, "selection_mode", "max")
        metric = self.selection_metric.removeprefix("val/")
        best = best_validation(record["evaluations"], metric, mode) if record else None
        if best is not None:
            summary = logger.experiment.summary
            summary[f"best/{self.selection_metric}"] = flat_metrics(best)[metric]
            summary["best/epochs_trained"] = epochs_trained(best)
            summary["best/global_step"] = int(best.get("global_step") or 0)
            summary["best/selected_on"] = (f"test split ({OPTIMISTIC})" if record.get("split") == "test"
                                           else f"{record.get('split')} split")  # fmt: skip
        if os.environ.get(ENV_CHECKPOINT, "").lower() == "best" and getattr(callback, "best_model_path", ""):
            import wandb

            score = getattr(callback, "best_model_score", None)
            artifact = wandb.Artifact(f"model-{logger.experiment.id}", type="model",
                                      metadata={self.selection_metric: None if score is None else float(score)})
            artifact.add_file(str(callback.best_model_path))
            logger.experiment.log_artifact(artifact, aliases=["best"])


def log_results_artifact(run_dir: Path) -> None:
    """The run's results files as a W&B artifact, once the command has ended and ``status.json`` holds
    its final state (completed, failed, interrupted): the snapshot never says "running"."""
    import sys

    wandb = sys.modules.get("wandb")  # never import wandb just to find no run
    run = getattr(wandb, "run", None) if wandb is not None else None
    files = [Path(run_dir) / name for name in RESULT_FILES if (Path(run_dir) / name).is_file()]
    if run is None or not files or not (Path(run_dir) / "metrics_test.json").is_file():
        return
    artifact = wandb.Artifact(f"results-{run.id}", type="results")
    for path in files:
        artifact.add_file(str(path))
    run.log_artifact(artifact)


def finish_wandb_run(exit_code: int) -> None:
    """Close the process's W&B run when a command ends, with its exit code (W&B marks a non-zero
    one as failed). Without it a second command in the same process (a notebook, a test) would be
    logged into the first one's run, which Lightning's ``WandbLogger`` reuses while it is open."""
    import sys

    wandb = sys.modules.get("wandb")  # never import wandb just to find nothing to close
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=exit_code)


def update_wandb_config(trainer: L.Trainer, values: Mapping[str, Any]) -> None:
    """Add what is known only after training (steps trained, why it stopped) to the run's W&B config, so
    W&B holds every field the local leaderboard groups and labels runs by."""
    logger = WandbResults._logger(trainer)
    if logger is not None and trainer.is_global_zero:
        logger.experiment.config.update(flatten(values), allow_val_change=True)
