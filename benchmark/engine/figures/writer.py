"""Drawing the registered figures, and the callback that draws them after every test of a run.

:func:`draw_figures` draws figures into a folder, writes each one's data as ``<name>.json`` and keeps
the figures' time budget; :func:`applicable` chooses the registered figures that apply to a method;
:func:`log_images` logs PNG files to W&B. :class:`FigureWriter` is the callback the run builder adds
to ``fit`` and ``test``: it records the training history the curves plot and draws the
``after_test`` figures into ``runs/<run>/figures/``. Apart from the figures themselves because it
draws whatever is registered, the generic figures of this package and the companions' alike
(``analyze``, :mod:`benchmark.app.analysis`, uses the same functions).
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from benchmark.core.contracts import FIGURES, Figure, logs_this_step
from benchmark.core.io import atomic_write_text
from benchmark.engine.evaluation.callback import RetrievalEvaluator
from benchmark.engine.figures.context import (
    ADAPTIVE,
    FIGURES_DIR,
    HISTORY_FILE,
    FigureContext,
    FigureResult,
    FigureSettings,
    FigureSkipped,
)
from benchmark.engine.figures.training_curves import TrainingHistory, run_evaluation_seconds


# ---------------------------------------------------------------------------- drawing and logging
def draw_figures(
    figures: Iterable[Figure], context: FigureContext, strict: bool = True
) -> dict[str, FigureResult]:
    """Draw each figure into ``context.out_dir``, with its data as ``<name>.json``.

    ``strict=False`` (after a run's test) turns a failing figure into a warning, so that a
    figure never fails the run it illustrates.

    Under a time budget (``context.deadline``) a figure starts only when the time left covers what
    it is expected to take, the mean of the figures drawn so far (the first always starts); one that
    does not is skipped and listed in ``context.skipped``, and its files from an earlier drawing
    (those its ``<name>.json`` lists) are removed, so that ``figures/`` never shows a figure of other
    weights next to this evaluation's.
    """
    results: dict[str, FigureResult] = {}
    for figure in figures:
        left, expected = context.seconds_left(), context.expected_seconds()
        if left is not None and expected is not None and left < expected:
            context.skipped.append(figure.name)
            _remove_drawing(context.out_dir, figure.name)
            continue
        start = time.perf_counter()
        try:
            result = figure.draw(context)
        except FigureSkipped as why:
            print(f"[benchmark] figure {figure.name}: skipped ({why})", file=sys.stderr)
            continue
        except Exception as err:
            if strict:
                raise
            where = traceback.extract_tb(err.__traceback__)[-1]
            warnings.warn(f"figure {figure.name!r} failed ({type(err).__name__}: {err}; {where.filename}:{where.lineno}); "
                          "the other figures are written", stacklevel=2)
            continue
        if result is None:
            continue
        seconds = round(time.perf_counter() - start, 3)
        context.drawn_seconds.append(seconds)
        payload = {"figure": figure.name, "owner": figure.owner, "files": [p.name for p in result.paths],
                   "seconds": seconds, **result.data}
        atomic_write_text(context.out_dir / f"{figure.name}.json", json.dumps(payload, indent=1, default=_json_default) + "\n")
        results[figure.name] = result
    return results


def _remove_drawing(out_dir: Path, name: str) -> None:
    """Remove ``<name>.json`` and the files it lists (an earlier drawing of the figure ``name``)."""
    record = out_dir / f"{name}.json"
    try:
        files = json.loads(record.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return
    for file in [*files, record.name]:
        if isinstance(file, str) and Path(file).name == file:  # a bare file name, inside out_dir
            (out_dir / file).unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def log_images(trainer: Any, paths: Sequence[Path], prefix: str = "figures") -> int:
    """Log PNGs to W&B as images (key ``<prefix>/<file stem>``) when a logger of the trainer is a
    WandbLogger; other loggers keep the files only. Returns the number of images logged."""
    from lightning.pytorch.loggers import WandbLogger

    logged = 0
    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, WandbLogger):
            for path in paths:
                logger.log_image(key=f"{prefix}/{Path(path).stem}", images=[str(path)], caption=[Path(path).stem])
                logged += 1
    return logged


def applicable(method: str, names: Sequence[str] | None = None, after_test: bool | None = None) -> list[Figure]:
    """The registered figures for ``method`` (all, the named ones, or those drawn after a test)."""
    chosen = [FIGURES[n] for n in names] if names else list(FIGURES.values())
    return [f for f in chosen if f.applies_to(method) and (after_test is None or f.after_test == after_test)]


# ---------------------------------------------------------------------------- the callback
class FigureWriter(Callback):
    """Draws the generic figures after every test of a run into ``<run>/figures/`` (rank 0),
    logs them to W&B when it is the logger, and records the training history they plot.

    The options are ``--figures.<name>`` on the command line (``--figures false`` is
    ``--figures.enabled false``) or a recipe's ``figures:`` section.

    Args:
        enabled: draw the figures after a test (``fit``, ``test``); off, nothing is written.
        names: the figures to draw (registered ``after_test`` ones); default all that apply.
        top_k: gallery images per query in the retrieval grid.
        queries: seeded random queries in the retrieval grid.
        worst_queries: the worst queries by first-positive rank added to them.
        max_classes: classes in the embedding map (a seeded subset beyond that).
        max_points: points in the embedding map (split over the sets of a before/after map).
        seed: seed of every sample and of the t-SNE.
        dpi: resolution of the PNG files.
        budget: the figures' time as a share of the run's evaluation time (every evaluation it
            recorded: ``seconds`` + ``embed_seconds`` in ``metrics_val.json`` and
            ``metrics_test.json``). A figure starts only while the time left covers what a
            figure takes here, else it is skipped and named (``analyze`` draws it); the
            embedding map, drawn last, shortens its t-SNE or falls back to PCA to fit and says
            so. None: no limit.
    """

    def __init__(
        self,
        enabled: bool = True,
        names: list[str] | None = None,
        top_k: int = 8,
        queries: int = 6,
        worst_queries: int = 3,
        max_classes: int = 20,
        max_points: int = 600,
        seed: int = 0,
        dpi: int = 100,
        budget: float | None = 0.1,
    ) -> None:
        super().__init__()
        bad = [f"{n}={v}" for n, v in (("top_k", top_k), ("max_classes", max_classes), ("max_points", max_points),
                                       ("dpi", dpi)) if v < 1]
        bad += [f"{n}={v}" for n, v in (("queries", queries), ("worst_queries", worst_queries)) if v < 0]
        bad += [f"budget={budget}"] if budget is not None and not budget > 0 else []
        if bad:
            raise ValueError(f"--figures: {', '.join(bad)} out of range (sizes >= 1, query counts >= 0, budget > 0 "
                             "or null).")
        self.enabled, self.names = bool(enabled), list(names) if names else None
        self.settings = FigureSettings(top_k, queries, worst_queries, max_classes, max_points, seed, dpi, budget)
        self.run_dir: Path | None = None  # set by the CLI; else the trainer's default_root_dir
        self.results: dict[str, FigureResult] = {}
        self.seconds = 0.0
        self.evaluation_seconds = 0.0  # the run's evaluations when the figures were last drawn
        self.skipped: list[str] = []  # the figures the last drawing skipped for time
        self._history: TrainingHistory | None = None

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.run_dir or trainer.default_root_dir)

    # ------------------------------------------------------------------ training history
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        if not logs_this_step(trainer):  # the steps whose values the method logged (the others are stale)
            return
        if self._history is None:
            self._history = TrainingHistory(self._dir(trainer) / FIGURES_DIR / HISTORY_FILE)
        self._history.record(trainer, batch_idx)

    def _flush(self) -> None:
        if self._history is not None:
            self._history.flush()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._flush()

    # ------------------------------------------------------------------ figures
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        self._flush()
        evaluator = next((c for c in trainer.callbacks if isinstance(c, RetrievalEvaluator)), None)
        evaluation = evaluator.last_evaluation if evaluator is not None else None
        if evaluation is None:
            return
        start = time.perf_counter()
        # The budget is a share of every evaluation the run recorded (this test's included); a run
        # whose records are not written (none found) counts this test's evaluation.
        self.evaluation_seconds = run_evaluation_seconds(self._dir(trainer)) or (
            evaluation.seconds + float(getattr(evaluator, "last_embed_seconds", 0.0) or 0.0))
        budget = self.settings.budget
        context = FigureContext(
            out_dir=self._dir(trainer) / FIGURES_DIR, evaluation=evaluation, model=pl_module,
            datamodule=getattr(trainer, "datamodule", None), run_dir=self._dir(trainer), settings=self.settings,
            selection_metric=selection_metric(trainer, pl_module), trainer=trainer,
            deadline=None if budget is None else start + budget * self.evaluation_seconds,
        )
        names = self.names
        if names:
            missing = [n for n in names if n not in FIGURES]
            if missing:
                warnings.warn(f"--figures.names: {', '.join(missing)} not registered in this run (a method's own figures "
                              f"are drawn by `python -m benchmark analyze NAME`); registered: {', '.join(sorted(FIGURES))}",
                              stacklevel=2)
            names = [n for n in names if n in FIGURES]
            if not names:
                return
        figures = applicable(context.method, names, after_test=None if names else True)
        figures.sort(key=lambda f: f.name in ADAPTIVE)  # those that fit the time left go last (stable otherwise)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(tight_layout|Glyph).*")
            self.results = draw_figures(figures, context, strict=False)
        paths = [p for r in self.results.values() for p in r.paths]
        log_images(trainer, paths)
        self.seconds = time.perf_counter() - start
        if paths:
            total = self.evaluation_seconds
            share = f", {100 * self.seconds / total:.1f} % of the run's {total:.1f}s of evaluation" if total else ""
            limit = f"; budget {100 * budget:g} %" if budget is not None else ""
            skipped = (f"; skipped for time: {', '.join(context.skipped)}, which `python -m benchmark analyze figures "
                       f"--ckpt {context.checkpoint_hint()}` draws" if context.skipped else "")
            print(f"[benchmark] figures: {', '.join(self.results)} -> {context.out_dir} ({self.seconds:.2f}s{share}{limit}"
                  f"{skipped})", file=sys.stderr)
        self.skipped = list(context.skipped)


def selection_metric(trainer: Any, pl_module: Any) -> str:
    """The metric the run's best checkpoint is chosen by (the checkpoint callback's, else the method's)."""
    callback = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
    monitor = getattr(callback, "monitor", None)
    return str(monitor or getattr(pl_module, "selection_metric", "val/R@1"))
