"""The generic figure ``training_curves``: the loss terms and the validation metrics against epochs trained.

It draws from the run's files, not from an evaluation: the training history that
:class:`TrainingHistory` records in ``<run>/figures/training_history.csv`` during a fit (for
:class:`~benchmark.engine.figures.writer.FigureWriter`; else the CSV logger's ``metrics.csv``) and
the records ``metrics_val.json`` / ``metrics_test.json``, from which :func:`run_evaluation_seconds`
also reads the evaluation time that the figures' budget is a share of.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from benchmark.core.contracts import register_figure
from benchmark.core.results import OPTIMISTIC, RecordError, best_validation, epochs_trained, read_record
from benchmark.engine.figures.context import (
    FIGURES_DIR,
    HISTORY_FILE,
    INCORRECT,
    FigureContext,
    FigureResult,
    FigureSkipped,
    plain_log_labels,
    set_title,
)
from benchmark.engine.plotting import fixed_layout, point_markers, pyplot


# ---------------------------------------------------------------------------- training curves
class TrainingHistory:
    """The training metrics (``train/*``) every ``log_every_n_steps`` steps, in
    ``<run>/figures/training_history.csv`` (step, epoch as a fraction, name, value).

    Recorded locally whatever the logger, because W&B's history is not readable offline; a
    resumed run appends to the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[tuple[int, float, str, float]] = []

    def record(self, trainer: L.Trainer, batch_idx: int) -> None:
        batches = trainer.num_training_batches
        fraction = (batch_idx + 1) / batches if isinstance(batches, int) and batches > 0 else 0.0
        epoch = trainer.current_epoch + fraction
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train/") and isinstance(value, torch.Tensor) and value.numel() == 1:
                self.rows.append((int(trainer.global_step), round(epoch, 6), name, float(value)))

    def flush(self) -> None:
        if not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(("step", "epoch", "name", "value"))
            writer.writerows(self.rows)
        self.rows = []


def read_training_history(run_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """``name -> (epochs, values)`` of the training metrics and where they came from.

    ``figures/training_history.csv`` (fractional epochs) when it exists, else the CSV logger's
    ``metrics.csv`` (epochs interpolated between the first logged steps of each epoch).
    """
    own = run_dir / FIGURES_DIR / HISTORY_FILE
    series: dict[str, dict[int, tuple[float, float]]] = {}
    if own.is_file():
        with open(own, newline="") as f:
            for row in csv.DictReader(f):
                with_value = row.get("value") not in (None, "")
                if with_value:
                    series.setdefault(row["name"], {})[int(row["step"])] = (float(row["epoch"]), float(row["value"]))
        source = f"{FIGURES_DIR}/{HISTORY_FILE}"
    elif (run_dir / "metrics.csv").is_file():
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        steps = [(int(r["step"]), int(float(r["epoch"]))) for r in rows if r.get("step") and r.get("epoch")]
        first: dict[int, int] = {}
        for step, epoch in steps:
            first[epoch] = min(first.get(epoch, step), step)
        anchors_s = [first[e] for e in sorted(first)]
        anchors_e = sorted(first)
        if len(anchors_s) >= 2:  # one more epoch's start beyond the last
            anchors_s.append(anchors_s[-1] + (anchors_s[-1] - anchors_s[-2]))
            anchors_e.append(anchors_e[-1] + 1)
        for r in rows:
            if not r.get("step"):
                continue
            step = int(r["step"])
            epoch = float(np.interp(step, anchors_s, anchors_e)) if len(anchors_s) >= 2 else float(r.get("epoch") or 0)
            for name, value in r.items():
                if name.startswith("train/") and value not in (None, ""):
                    series.setdefault(name, {})[step] = (epoch, float(value))
        source = "metrics.csv"
    else:
        return {}, "none"
    out = {}
    for name, points in series.items():
        steps = sorted(points)
        out[name] = (np.array([points[s][0] for s in steps]), np.array([points[s][1] for s in steps]))
        out[name + "@step"] = (np.array(steps, dtype=np.float64), np.array([points[s][1] for s in steps]))
    return out, source


def _record(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The run's ``metrics_<stage>.json`` (:func:`benchmark.core.results.read_record`), None when it is
    missing or unreadable (a figure never fails on a record it cannot read)."""
    path = Path(run_dir) / f"metrics_{stage}.json"
    if not path.is_file():
        return None
    try:
        return read_record(path)
    except RecordError:
        return None


def run_evaluation_seconds(run_dir: Path) -> float:
    """Every evaluation the run recorded (``metrics_val.json`` and ``metrics_test.json``): the sum of
    their ``seconds`` (gather, refine, metrics) and ``embed_seconds`` (the loop over the split)."""
    total = 0.0
    for stage in ("val", "test"):
        record = _record(run_dir, stage)
        for entry in (record or {}).get("evaluations", []):
            for key in ("seconds", "embed_seconds"):
                value = entry.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    total += float(value)
    return total


def _metric_of(evaluation: Mapping[str, Any], group: str, metric: str) -> float | None:
    values = evaluation.get("metrics", {}) if not group else evaluation.get("refined", {}).get(group, {})
    value = values.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _split_metric(name: str) -> tuple[str, str, str]:
    """``val/refined/R@1`` -> (``val``, ``refined``, ``R@1``)."""
    stage, _, rest = name.partition("/")
    group, _, metric = rest.rpartition("/")
    return stage, group, metric


def _epochs_text(epochs: float) -> str:
    return f"{epochs:g} epoch" + ("" if epochs == 1 else "s")


@register_figure(
    "training_curves",
    "loss terms and validation metrics against epochs trained, the checkpoint's selection metric marked",
    after_test=True,
    evaluation=False,
)
def training_curves(context: FigureContext) -> FigureResult:
    """Left: the loss terms; right: the validation metrics (percent) and the tests, against epochs
    trained (:func:`benchmark.core.results.epochs_trained`: 0 is the untrained model, 1 the end of the first epoch).

    The star marks the best validation by the run's selection metric as
    :func:`benchmark.core.results.best_validation` defines it (after training started, ties to the
    earliest: the checkpoint callback's best), never the untrained pre-fit evaluation; under the paper
    protocol (validation on the test split) its label says that it was selected on the test split.
    """
    plt = pyplot()
    run_dir = context.run_dir
    if run_dir is None:
        raise ValueError("training_curves draws from a run directory (--ckpt of a run's checkpoints/).")
    history, source = read_training_history(run_dir)
    val_record, test_record = _record(run_dir, "val"), _record(run_dir, "test")
    vals = list((val_record or {}).get("evaluations", []))
    tests = list((test_record or {}).get("evaluations", []))
    if not history and not vals and not tests:
        raise FigureSkipped(f"{run_dir} holds no training history and no evaluation")
    selection = context.selection_metric or "val/R@1"
    mode = str(getattr(context.model, "selection_mode", "max") or "max")
    _, sel_group, sel_metric = _split_metric(selection)
    val_split = str((val_record or {}).get("split") or "validation")
    on_test = val_split == "test"  # the paper protocol: the validation split is the test split

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    terms = sorted(n for n in history if not n.endswith("@step") and n != "train/grad_norm")
    drawn_terms = []
    for name in ["train/loss"] + [t for t in terms if t != "train/loss"]:
        if name not in history:
            continue
        x, y = history[name]
        ax_loss.plot(x, y, linewidth=1.6 if name == "train/loss" else 0.9, label=name.removeprefix("train/"),
                     color="black" if name == "train/loss" else None, alpha=1.0 if name == "train/loss" else 0.85,
                     **point_markers(len(x), 2.5))
        drawn_terms.append(name)
    ax_loss.set_xlabel("epochs trained")
    set_title(ax_loss, f"training loss terms ({source})", 9)
    if drawn_terms:
        ax_loss.legend(fontsize=7, frameon=False)
        ys = np.concatenate([history[n][1] for n in drawn_terms])
        if np.all(ys > 0) and ys.max() / max(ys.min(), 1e-12) > 100:
            ax_loss.set_yscale("log")
            plain_log_labels(ax_loss.yaxis)
    else:
        ax_loss.text(0.5, 0.5, "no training history in this run\n(figures off, or evaluated only)", ha="center",
                     va="center", transform=ax_loss.transAxes, fontsize=8)
    groups = [g for g in ["", "refined", sel_group] if g == "" or any(g in e.get("refined", {}) for e in vals)]
    groups = list(dict.fromkeys(groups))  # plain, refined, and the selection metric's group
    series_out: dict[str, Any] = {}
    for group in groups:
        for metric, style in (("R@1", "-"), ("MAP@R", "--")):
            points = [(epochs_trained(e), _metric_of(e, group, metric)) for e in vals]
            points = [(x, y) for x, y in points if y is not None]
            if not points:
                continue
            name = f"val/{group + '/' if group else ''}{metric}"
            selected = group == sel_group and metric == sel_metric
            xs, ys = zip(*points)
            ax_val.plot(xs, [100 * y for y in ys], style, marker="o", markersize=3.5 if not selected else 5.5,
                        linewidth=2.2 if selected else 1.0, label=name + ("  (selects the checkpoint)" if selected else ""),
                        color="black" if selected else None, zorder=3 if selected else 2)
            series_out[name] = {"epochs_trained": list(xs), "values": list(ys)}
    best_entry = best_validation(vals, selection.split("/", 1)[1] if "/" in selection else selection, mode)
    best: dict[str, Any] | None = None
    if best_entry is not None and _metric_of(best_entry, sel_group, sel_metric) is not None:
        value, at = float(_metric_of(best_entry, sel_group, sel_metric)), epochs_trained(best_entry)
        name = f"val/{sel_group + '/' if sel_group else ''}{sel_metric}"
        label = f"best {name} {100 * value:.1f} % after {_epochs_text(at)}" + (f" ({OPTIMISTIC})" if on_test else "")
        ax_val.scatter([at], [100 * value], marker="*", s=180, color="gold", edgecolor="black", zorder=4, label=label)
        best = {"metric": name, "value": value, "epochs_trained": at, "global_step": int(best_entry.get("global_step") or 0),
                "mode": mode, "split": val_split, "optimistic": on_test, "label": label}
    test_name = f"test/{sel_group + '/' if sel_group else ''}{sel_metric}"
    for e in tests:
        value = _metric_of(e, sel_group, sel_metric)
        if value is not None:
            ax_val.scatter([epochs_trained(e)], [100 * value], marker="D", s=36, color=INCORRECT, edgecolor="black",
                           zorder=4, label=test_name if test_name not in series_out else None)
            series_out.setdefault(test_name, []).append(
                {"epochs_trained": epochs_trained(e), "value": value, "role": e.get("role"),
                 "checkpoint": (e.get("checkpoint") or {}).get("selected_by")})
    if not vals and not tests:
        ax_val.text(0.5, 0.5, "no evaluation recorded yet", ha="center", va="center", transform=ax_val.transAxes, fontsize=8)
    ax_val.set_xlabel("epochs trained")
    ax_val.set_ylabel("R@1, MAP@R (%)")
    where = f"on the {val_split} split" + (" (paper protocol)" if on_test else "")
    why_none = "\nno validation after training started: no best" if vals and best is None else ""
    set_title(ax_val, f"validation {where}\ncheckpoint selected by {selection} ({mode}){why_none}", 8)
    if ax_val.get_legend_handles_labels()[0]:
        ax_val.legend(fontsize=6.5, frameon=False)
    fig.suptitle(f"{context.method}: {run_dir.name}", fontsize=9)
    fixed_layout(fig, left=0.6, right=0.15, top=0.75 + (0.12 if why_none else 0.0), bottom=0.45, wspace=0.8)
    data = {"source": source, "selection_metric": selection, "best": best, "validation": series_out,
            "training_terms": [n.removeprefix("train/") for n in drawn_terms],
            "validations": len(vals), "tests": len(tests), "unit": "fractions, as recorded (the axes show percent)"}
    return FigureResult([context.save(fig, "training_curves")], data)
