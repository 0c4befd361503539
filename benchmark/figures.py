"""The figure layer: figures every run and every method gets, and the means to add more.

A figure is a function ``draw(context) -> FigureResult`` registered with
``@register_figure(name, summary, ...)`` (:mod:`benchmark.core`) in the module that owns it:
the four generic figures below, a method's own in ``methods/<method>_analysis.py``. Every
registered figure is a command, ``python -m benchmark analyze NAME --ckpt PATH``
(:mod:`benchmark.analysis` rebuilds the run from its checkpoint, evaluates it once and draws);
the ``after_test`` ones are also drawn by :class:`FigureWriter`, the callback the CLI adds to
``fit`` and ``test``, into ``runs/<run>/figures/`` after every test (``--figures false`` turns
it off), and logged to W&B as images when W&B is the logger.

The figures draw what the evaluation scored, not a second computation of it: the
:class:`~benchmark.evaluation.RetrievalEvaluator` keeps its last test evaluation (embeddings,
labels, query/gallery flags, dataset indices, the method's refined outputs and the metrics),
and the rankings shown are those of :func:`~benchmark.evaluation.metrics.query_rankings` (the
metrics' scores and tie rule) or the method's own ranked lists.

Generic figures (``after_test``):

* ``retrieval_grid``: for a seeded sample of queries and the worst queries by first-positive
  rank, the query and its top-k gallery images, each marked correct (solid green border, ✓) or
  incorrect (dashed red border, ✗), with the similarity under it; one file per ranking
  (plain, and refined when the method refines);
* ``embedding_map``: a 2-D t-SNE map (openTSNE) of the test embeddings coloured by class
  (a seeded subset of classes and points); for a method whose refinement returns embeddings,
  before and after refinement on one projection fitted to both;
* ``per_class_recall``: the distribution of per-class R@1 and the worst classes by name;
* ``training_curves``: the loss terms and the validation metrics against epoch, from the run's
  files (``figures/training_history.csv`` recorded by :class:`FigureWriter`, else the CSV
  logger's ``metrics.csv``; ``metrics_val.json``, ``metrics_test.json``), with the metric the
  checkpoint is selected by marked.

Everything is headless (matplotlib's Agg backend, the DejaVu fonts matplotlib ships) and
deterministic for a given checkpoint and seed (seeded samples, seeded t-SNE on one thread).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from benchmark.core import FIGURES, Figure, RankedLists, logs_this_step, register_figure
from benchmark.evaluation.callback import Evaluation, RetrievalEvaluator
from benchmark.evaluation.metrics import QueryRankings, query_rankings, ranked_list_rankings
from benchmark.io import atomic_write_text

FIGURES_DIR = "figures"
HISTORY_FILE = "training_history.csv"  # in <run>/figures/: the training curves' data
CORRECT, INCORRECT, QUERY = "#1a9850", "#d73027", "#2c7bb6"  # green, red, blue
MARKS = {True: "\u2713", False: "\u2717"}  # ✓ ✗ (DejaVu Sans has both)


# ---------------------------------------------------------------------------- settings and results
@dataclass(frozen=True)
class FigureSettings:
    """What the figures show; ``--figures.*`` on the command line (:class:`FigureWriter`)."""

    top_k: int = 8
    queries: int = 6
    worst_queries: int = 3
    max_classes: int = 20
    max_points: int = 600
    seed: int = 0
    dpi: int = 100


class FigureSkipped(Exception):
    """Raised by a figure that has nothing to draw here (said in one line, no file written)."""


@dataclass
class FigureResult:
    """The files a figure wrote and the data it drew (also written as ``<name>.json``)."""

    paths: list[Path]
    data: dict[str, Any] = field(default_factory=dict)


class _Pyplot:
    """The few pyplot calls the figures use, on matplotlib's object-oriented API: every figure has
    its own Agg canvas (no display, no backend switch, no global figure list), so drawing is
    headless and leaves a notebook's or a GUI session's matplotlib alone. Text is DejaVu Sans,
    the font matplotlib ships."""

    def figure(self, figsize: tuple[float, float] | None = None, dpi: float | None = None) -> Any:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, dpi=dpi)
        FigureCanvasAgg(fig)
        return fig

    def subplots(self, nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
        fig = self.figure(kwargs.pop("figsize", None), kwargs.pop("dpi", None))
        return fig, fig.subplots(nrows, ncols, **kwargs)

    @staticmethod
    def get_cmap(name: str) -> Any:
        import matplotlib

        return matplotlib.colormaps[name]

    @property
    def Line2D(self) -> Any:  # noqa: N802 (pyplot's name)
        from matplotlib.lines import Line2D

        return Line2D

    @staticmethod
    def close(fig: Any) -> None:
        """Nothing to release: the figure is not registered anywhere."""


_PYPLOT = _Pyplot()


def pyplot() -> _Pyplot:
    """Figure making for the figure layer (see :class:`_Pyplot`): ``pyplot().subplots(...)``."""
    return _PYPLOT


def fixed_layout(fig: Any, left: float, right: float, top: float, bottom: float, wspace: float = 0.0,
                 hspace: float = 0.0) -> None:
    """Margins and gaps in inches, set once (``subplots_adjust``).

    The after-test figures use this instead of ``tight_layout``, which lays the figure out by
    drawing it once more before saving: that extra draw was ~40 % of their drawing time.
    ``wspace``/``hspace`` are the gaps between panels.
    """
    width, height = fig.get_size_inches()
    grid = fig.axes[0].get_subplotspec().get_gridspec() if fig.axes else None
    ncols, nrows = (grid.ncols, grid.nrows) if grid is not None else (1, 1)
    panel_w = max(1e-3, (width - left - right - wspace * (ncols - 1)) / ncols)
    panel_h = max(1e-3, (height - top - bottom - hspace * (nrows - 1)) / nrows)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=wspace / panel_w, hspace=hspace / panel_h)


# ---------------------------------------------------------------------------- context
@dataclass
class FigureContext:
    """Everything a figure may draw from.

    Attributes:
        out_dir: where the figure writes its files.
        evaluation: the evaluator's last evaluation (None for figures that need none).
        model: the LightningModule (trained weights; ``initial_model``: before them).
        datamodule: the run's datamodule (records of the evaluated split, transforms).
        run_dir: the run directory (results files, training history), if any.
        settings: sample sizes and the seed.
        selection_metric: the metric the run's checkpoints are selected by.
    """

    out_dir: Path
    evaluation: Evaluation | None = None
    model: Any = None
    datamodule: Any = None
    run_dir: Path | None = None
    settings: FigureSettings = field(default_factory=FigureSettings)
    selection_metric: str | None = None
    initial_model: Any = None
    trainer: Any = None
    _rankings: dict[str, QueryRankings] = field(default_factory=dict, repr=False)
    _thumbs: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _names: dict[int, str] | None = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return int(self.settings.seed)

    @property
    def method(self) -> str:
        return str(getattr(self.model, "method_name", "") or type(self.model).__name__) if self.model is not None else ""

    def require_evaluation(self) -> Evaluation:
        if self.evaluation is None:
            raise ValueError("This figure draws from an evaluation; none was kept (run it after a test).")
        return self.evaluation

    @property
    def records(self) -> Any:
        """The evaluated split's records (``paths``, ``labels``, ``class_ids``), or None."""
        stage = self.evaluation.stage if self.evaluation is not None else "test"
        try:
            return getattr(self.datamodule, f"{stage}_records", None) if self.datamodule is not None else None
        except Exception:  # a datamodule that cannot load its records here: no images, no names
            return None

    def path(self, stem: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / f"{stem}.png"

    def save(self, fig: Any, stem: str) -> Path:
        """Write a matplotlib figure as ``<out_dir>/<stem>.png`` and close it."""
        plt = pyplot()
        path = self.path(stem)
        fig.savefig(path, dpi=self.settings.dpi, metadata={"Software": None})
        plt.close(fig)
        return path

    # ------------------------------------------------------------------ rankings
    def ranking_keys(self) -> list[str]:
        """``""`` (the plain embeddings) and ``"refined"`` when the method refined its output."""
        evaluation = self.require_evaluation()
        return [""] + (["refined"] if "" in evaluation.refined else [])

    def rankings(self, key: str = "", k: int | None = None) -> QueryRankings:
        """The ranking the metrics scored: plain (``""``), or ``"refined"``/``"refined/<key>"``."""
        evaluation = self.require_evaluation()
        k = self.settings.top_k if k is None else int(k)
        cache = f"{key}@{k}"
        if cache not in self._rankings:
            refined_key = key.split("/", 1)[1] if key.startswith("refined/") else ("" if key == "refined" else None)
            value = evaluation.embeddings if refined_key is None else evaluation.refined[refined_key]
            args = (evaluation.labels, evaluation.is_query, evaluation.is_gallery)
            if isinstance(value, RankedLists):
                self._rankings[cache] = ranked_list_rankings(value, *args, embeddings=evaluation.embeddings, k=k)
            else:
                self._rankings[cache] = query_rankings(value, *args, k=k)
        return self._rankings[cache]

    # ------------------------------------------------------------------ images and names
    def thumbnail(self, index: int, size: int = 80) -> np.ndarray:
        """(size, size, 3) uint8 of the evaluated split's image ``index`` (grey when unavailable)."""
        key = (int(index), size)
        if key not in self._thumbs:
            self._thumbs[key] = _load_thumbnail(self.records, int(index), size)
        return self._thumbs[key]

    def class_names(self) -> dict[int, str]:
        """label -> a readable name: the image folder when each class has its own (CUB, the
        embedded default), else ``class <original id>``."""
        if self._names is None:
            self._names = self._class_names()
        return self._names

    def _class_names(self) -> dict[int, str]:
        records = self.records
        evaluation = self.evaluation
        labels = evaluation.labels.numpy() if evaluation is not None else np.zeros(0, dtype=np.int64)
        ids = getattr(records, "class_ids", None) if records is not None else None
        names = {int(lab): f"class {int(ids[lab]) if ids is not None and len(ids) > lab else int(lab)}" for lab in np.unique(labels)}
        paths = getattr(records, "paths", None) if records is not None else None
        if paths is None or evaluation is None:
            return names
        folders: dict[int, set[str]] = {}
        for idx, lab in zip(evaluation.indices.tolist(), labels.tolist()):
            if 0 <= idx < len(paths):
                folders.setdefault(int(lab), set()).add(Path(paths[idx]).parent.name)
        single = {lab: next(iter(f)) for lab, f in folders.items() if len(f) == 1}
        if len(single) == len(names) and len(set(single.values())) == len(single):
            names.update(single)
        return names


def _load_thumbnail(records: Any, index: int, size: int) -> np.ndarray:
    from PIL import Image, ImageOps

    paths = getattr(records, "paths", None) if records is not None else None
    if paths is not None and 0 <= index < len(paths):
        try:
            with Image.open(paths[index]) as img:
                return np.asarray(ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BICUBIC))
        except OSError:
            pass
    return np.full((size, size, 3), 200, dtype=np.uint8)


# ---------------------------------------------------------------------------- drawing and logging
def draw_figures(
    figures: Iterable[Figure], context: FigureContext, strict: bool = True
) -> dict[str, FigureResult]:
    """Draw each figure into ``context.out_dir``, with its data as ``<name>.json``.

    ``strict=False`` (after a run's test) turns a failing figure into a warning, so that a
    figure never fails the run it illustrates.
    """
    results: dict[str, FigureResult] = {}
    for figure in figures:
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
        payload = {"figure": figure.name, "owner": figure.owner, "files": [p.name for p in result.paths],
                   "seconds": seconds, **result.data}
        atomic_write_text(context.out_dir / f"{figure.name}.json", json.dumps(payload, indent=1, default=_json_default) + "\n")
        results[figure.name] = result
    return results


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


# ---------------------------------------------------------------------------- sampling and projection
def sample_queries(rankings: QueryRankings, count: int, worst: int, seed: int) -> list[tuple[str, int]]:
    """``count`` seeded random queries with a positive, then the ``worst`` by first-positive rank
    (ties to the lower dataset index) not already chosen: (kind, row in ``rankings``)."""
    rows = np.flatnonzero(rankings.first_positive.numpy() >= 0)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(rows, size=min(count, len(rows)), replace=False).tolist()) if count > 0 else []
    picked = [("random", int(r)) for r in chosen]
    if worst > 0:
        first = rankings.first_positive.numpy()
        order = rows[np.argsort(-first[rows], kind="stable")]
        taken = set(chosen)
        for r in order:
            if len(picked) >= len(chosen) + worst:
                break
            if int(r) not in taken:
                picked.append(("worst", int(r)))
    return picked


def sample_points(labels: np.ndarray, max_classes: int, max_points: int, seed: int) -> np.ndarray:
    """Seeded positions: at most ``max_classes`` classes, at most ``max_points`` points spread
    evenly over them (ascending positions)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if len(classes) > max_classes:
        classes = np.sort(rng.choice(classes, size=max_classes, replace=False))
    per_class = max(1, max_points // max(1, len(classes)))
    picked = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) > per_class:
            members = np.sort(rng.choice(members, size=per_class, replace=False))
        picked.append(members)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def project_2d(points: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """(n, D) -> (n, 2) by t-SNE (openTSNE: Barnes-Hut, exact neighbours, PCA initialisation,
    seeded: the same input gives the same map), and the method's name.

    It runs on torch's thread count: openTSNE's result does not depend on its ``n_jobs``
    (tested), and 2 threads took 0.65 s where 1 took 1.0 s (600 points of the main job).

    A short schedule (100 early-exaggeration + 200 iterations; openTSNE's default is 250 + 500)
    keeps a 600-point map near half a second: on the main job's 600 test embeddings the final KL
    divergence is 0.529, against 0.519 with 125 + 300 and 0.520 with the default (2-core AMD
    EPYC: 0.69 s, 0.99 s, 1.59 s). Fewer than 12 points, or without openTSNE, PCA is used and
    named.
    """
    x = np.asarray(points, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # the cosine geometry the metrics use
    if len(x) >= 12:
        try:
            from openTSNE import TSNE
        except ImportError:
            TSNE = None
        if TSNE is not None:
            tsne = TSNE(
                n_components=2, perplexity=float(min(30.0, (len(x) - 1) / 3.5)), n_iter=200, early_exaggeration_iter=100,
                negative_gradient_method="bh", neighbors="exact", initialization="pca", random_state=int(seed), n_jobs=max(1, torch.get_num_threads()),
                verbose=False,
            )
            return np.asarray(tsne.fit(x)), "t-SNE (openTSNE)"
    centred = x - x.mean(axis=0)
    if len(x) < 2:
        return np.zeros((len(x), 2)), "PCA"
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[:2].T
    if proj.shape[1] < 2:
        proj = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
    signs = np.sign(proj[np.abs(proj).argmax(axis=0), range(2)])  # a deterministic orientation
    return proj * np.where(signs == 0, 1, signs), "PCA" + ("" if len(x) < 12 else " (openTSNE not installed)")


def class_colours(labels: Sequence[int]) -> dict[int, Any]:
    """A colour per class: tab20 (tab20 + tab20b beyond 20 classes, then cycling)."""
    plt = pyplot()
    palette = [plt.get_cmap("tab20")(i) for i in range(20)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    return {int(c): palette[i % len(palette)] for i, c in enumerate(sorted(set(int(c) for c in labels)))}


# ---------------------------------------------------------------------------- retrieval grid
def _font(size_px: float, bold: bool = False) -> Any:
    """DejaVu Sans (shipped with matplotlib) at a pixel size, for text drawn with Pillow."""
    from matplotlib import font_manager
    from PIL import ImageFont

    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal"))
    return ImageFont.truetype(path, max(6, round(size_px)))


def _dashed_box(draw: Any, box: tuple[int, int, int, int], colour: str, width: int, dash: int) -> None:
    """A rectangle outline of dashes (the incorrect mark: tells itself apart in greyscale too)."""
    x0, y0, x1, y1 = box
    for a in range(x0, x1, 2 * dash):
        for y in (y0, y1 - width + 1):
            draw.rectangle((a, y, min(a + dash, x1), y + width - 1), fill=colour)
    for a in range(y0, y1, 2 * dash):
        for x in (x0, x1 - width + 1):
            draw.rectangle((x, a, x + width - 1, min(a + dash, y1)), fill=colour)


def draw_retrieval_grid(
    context: FigureContext, key: str, rows: list[tuple[str, int]], stem: str, title: str = ""
) -> tuple[Path, list[dict[str, Any]]]:
    """One row per query: the query, then its top-k gallery images marked correct/incorrect.

    Correct: a solid green border and a ✓ on a disc; incorrect: a dashed red border and a ✗
    (the border's pattern and the glyph read in greyscale, where the colours do not). Drawn
    with Pillow, pixel for pixel (thumbnails are not resampled twice), DejaVu Sans text.
    Returns the PNG and the panel data drawn: per row the query (dataset index, label, first
    positive rank) and per neighbour its dataset index, label, ``correct`` and similarity.
    """
    from PIL import Image, ImageDraw

    evaluation = context.require_evaluation()
    rankings = context.rankings(key)
    labels, indices = evaluation.labels.numpy(), evaluation.indices.numpy()
    k = int(rankings.top.shape[1])
    dpi = context.settings.dpi  # the layout is in inches, drawn at this resolution
    cell, gap, label_h, head_w, border = (max(2, round(inches * dpi)) for inches in (0.8, 0.1, 0.2, 1.45, 0.03))
    small, text_px = 6.5 * dpi / 72, 7.0 * dpi / 72  # 6.5 pt and 7 pt
    width = head_w + (k + 1) * (cell + gap) + 2 * gap
    wrapped = textwrap.wrap(title, width=max(20, int(width / (0.55 * text_px)))) if title else []
    top = round(len(wrapped) * text_px * 1.3 + gap) if wrapped else 0
    height = top + max(1, len(rows)) * (cell + label_h + gap) + gap
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, font_small, font_mark = _font(text_px), _font(small), _font(8.5 * dpi / 72, bold=True)
    for i, line in enumerate(wrapped):
        draw.text((width / 2, gap / 2 + i * text_px * 1.3), line, fill="black", font=font, anchor="ma")
    panels: list[dict[str, Any]] = []
    radius = round(0.075 * dpi)
    for r, (kind, row) in enumerate(rows):
        y = top + gap + r * (cell + label_h + gap)
        qpos = int(rankings.queries[row])
        qlabel = int(labels[qpos])
        first = int(rankings.first_positive[row])
        beyond = bool(rankings.list_length and first >= rankings.list_length)
        head = [("random query" if kind == "random" else "worst query"), f"index {int(indices[qpos])}",
                f"first positive: beyond the {rankings.list_length}-long list" if beyond else f"first positive: rank {first + 1}"]
        for i, line in enumerate(head):
            draw.text((gap, y + cell / 2 + (i - 1) * text_px * 1.3), line, fill="black", font=font, anchor="lm")
        x = head_w + gap
        image.paste(Image.fromarray(context.thumbnail(int(indices[qpos]), cell)), (x, y))
        draw.rectangle((x - border, y - border, x + cell + border - 1, y + cell + border - 1), outline=QUERY, width=border)
        draw.text((x + cell / 2, y + cell + border + 1), f"class {qlabel}", fill="black", font=font_small, anchor="ma")
        neighbours = []
        for j in range(k):
            pos = int(rankings.top[row, j])
            if pos < 0:
                continue
            xj = head_w + gap + (j + 1) * (cell + gap) + gap
            correct = bool(labels[pos] == qlabel)
            score = float(rankings.scores[row, j])
            colour = CORRECT if correct else INCORRECT
            image.paste(Image.fromarray(context.thumbnail(int(indices[pos]), cell)), (xj, y))
            box = (xj - border, y - border, xj + cell + border - 1, y + cell + border - 1)
            if correct:
                draw.rectangle(box, outline=colour, width=border)
            else:
                _dashed_box(draw, box, colour, border, max(3, round(0.06 * dpi)))
            cx, cy = xj + radius + 2, y + radius + 2
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour, outline="white", width=1)
            draw.text((cx, cy + 1), MARKS[correct], fill="white", font=font_mark, anchor="mm")
            caption = (f"{score:.3f}" if math.isfinite(score) else "n/a") + f"  #{j + 1}"
            draw.text((xj + cell / 2, y + cell + border + 1), caption, fill="black" if correct else "#7f0000",
                      font=font_small, anchor="ma")
            neighbours.append({"rank": j + 1, "index": int(indices[pos]), "label": int(labels[pos]), "correct": correct,
                               "score": score if math.isfinite(score) else None})
        panels.append({"kind": kind, "query": int(indices[qpos]), "label": qlabel, "first_positive_rank": first + 1,
                       "beyond_list": beyond, "neighbours": neighbours})
    path = context.path(stem)
    image.save(path, dpi=(dpi, dpi))
    return path, panels


def _ranking_label(key: str) -> str:
    return "plain embeddings" if key == "" else f"{key} ranking"


def _score_caption(rankings: QueryRankings) -> str:
    return ("similarity: cosine of the plain embeddings (the refined lists carry no scores)" if rankings.list_length
            else "similarity: cosine")


@register_figure(
    "retrieval_grid",
    "queries (a seeded sample and the worst by first-positive rank) with their top-k, marked correct/incorrect",
    after_test=True,
)
def retrieval_grid(context: FigureContext) -> FigureResult:
    settings = context.settings
    paths, data = [], {}
    base = context.rankings("")
    random_rows = [r for kind, r in sample_queries(base, settings.queries, 0, context.seed) if kind == "random"]
    for key in context.ranking_keys():
        rankings = context.rankings(key)
        worst = [r for kind, r in sample_queries(rankings, 0, settings.worst_queries + len(random_rows), context.seed)
                 if r not in random_rows][: settings.worst_queries]
        rows = [("random", r) for r in random_rows] + [("worst", r) for r in worst]
        stem = "retrieval_grid" + ("" if key == "" else "_" + key.replace("/", "_"))
        title = (f"{context.method}: top {rankings.top.shape[1]} of {_ranking_label(key)}, R@1 {100 * rankings.recall_at_1():.1f} %"
                 f"  ({settings.queries} seeded random queries, seed {context.seed}, and the worst); "
                 f"\u2713 solid green = same class, \u2717 dashed red = other class; {_score_caption(rankings)}")
        path, panels = draw_retrieval_grid(context, key, rows, stem, title)
        paths.append(path)
        data[key or "plain"] = {"rows": panels, "recall_at_1": rankings.recall_at_1()}
    return FigureResult(paths, {"seed": context.seed, "top_k": settings.top_k, "rankings": data})


# ---------------------------------------------------------------------------- embedding map
def embedding_sets(context: FigureContext) -> list[tuple[str, torch.Tensor]]:
    """The embeddings to map: the plain ones, and the refined output when it is embeddings."""
    evaluation = context.require_evaluation()
    sets = [("plain", evaluation.embeddings)]
    refined = evaluation.refined.get("")
    if isinstance(refined, torch.Tensor):
        sets.append(("refined", refined))
    return sets


def draw_maps(
    context: FigureContext, sets: list[tuple[str, torch.Tensor]], stem: str, title: str, trails: bool = False
) -> tuple[Path, dict[str, Any]]:
    """One panel per set of embeddings, the same seeded points in each, on one t-SNE fitted to
    all sets together (sets of different sizes are projected separately, and say so)."""
    plt = pyplot()
    evaluation = context.require_evaluation()
    settings = context.settings
    labels = evaluation.labels.numpy()
    per_set = max(10, settings.max_points // len(sets))
    picked = sample_points(labels, settings.max_classes, per_set, context.seed)
    dims = {int(v.shape[1]) for _, v in sets}
    if len(dims) == 1:
        joint, method = project_2d(np.concatenate([v[picked].numpy() for _, v in sets]), context.seed)
        coords = np.split(joint, len(sets))
        shared = f"one {method} map of all {len(sets)} sets" if len(sets) > 1 else method
    else:
        projected = [project_2d(v[picked].numpy(), context.seed) for _, v in sets]
        coords, method = [c for c, _ in projected], projected[0][1]
        shared = f"{method}, each set projected separately (dimensions differ)"
    colours = class_colours(labels[picked])
    names = context.class_names()
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets) + 1.6, 4.4), squeeze=False)
    allxy = np.concatenate(coords)
    lo, hi = allxy.min(axis=0), allxy.max(axis=0)
    pad = 0.04 * np.maximum(hi - lo, 1e-9)
    for i, ((name, _), xy) in enumerate(zip(sets, coords)):
        ax = axes[0][i]
        if trails and i > 0:
            for a, b in zip(coords[i - 1], xy):
                ax.plot((a[0], b[0]), (a[1], b[1]), color="0.8", linewidth=0.4, zorder=1)
        ax.scatter(xy[:, 0], xy[:, 1], c=[colours[int(c)] for c in labels[picked]], s=9, linewidths=0, zorder=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xticks([])
        ax.set_yticks([])
    shown = sorted(colours)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[c], markersize=4, label=names.get(c, str(c))[:22])
               for c in shown[:20]]
    axes[0][-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6, frameon=False,
                       title=f"{len(shown)} classes" + (" (20 listed)" if len(shown) > 20 else ""), title_fontsize=7)
    fig.suptitle(f"{title}\n{len(picked)} points of {len(shown)} of {len(np.unique(labels))} classes (seed {context.seed}); {shared}",
                 fontsize=8)
    fixed_layout(fig, left=0.15, right=1.45, top=0.75, bottom=0.15, wspace=0.25)
    path = context.save(fig, stem)
    data = {
        "projection": method, "shared_projection": len(dims) == 1, "seed": context.seed,
        "indices": evaluation.indices.numpy()[picked], "labels": labels[picked],
        "sets": {name: np.round(xy, 4) for (name, _), xy in zip(sets, coords)},
    }
    return path, data


@register_figure(
    "embedding_map",
    "2-D t-SNE map of the test embeddings by class (before/after refinement on one projection)",
    after_test=True,
)
def embedding_map(context: FigureContext) -> FigureResult:
    sets = embedding_sets(context)
    title = f"{context.method}: test embeddings" + (" before and after refinement" if len(sets) > 1 else "")
    path, data = draw_maps(context, sets, "embedding_map", title)
    return FigureResult([path], data)


# ---------------------------------------------------------------------------- per-class recall
def per_class_recall_at_1(rankings: QueryRankings, labels: np.ndarray) -> dict[int, tuple[float, int]]:
    """label -> (R@1 over its queries that have a positive, number of those queries)."""
    has = rankings.first_positive.numpy() >= 0
    qlabels = labels[rankings.queries.numpy()][has]
    hits = (rankings.first_positive.numpy()[has] == 0).astype(np.float64)
    out = {}
    for c in np.unique(qlabels):
        mask = qlabels == c
        out[int(c)] = (float(hits[mask].mean()), int(mask.sum()))
    return out


@register_figure("per_class_recall", "distribution of per-class R@1, the worst classes named", after_test=True)
def per_class_recall(context: FigureContext) -> FigureResult:
    plt = pyplot()
    evaluation = context.require_evaluation()
    labels = evaluation.labels.numpy()
    names = context.class_names()
    keys = context.ranking_keys()
    worst_n = 10
    fig, axes = plt.subplots(len(keys), 2, figsize=(9.0, 3.0 * len(keys)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.1, 1.0]})
    data: dict[str, Any] = {}
    for row, key in enumerate(keys):
        rankings = context.rankings(key)
        recall = per_class_recall_at_1(rankings, labels)
        values = np.array([v for v, _ in recall.values()])
        micro = rankings.recall_at_1()
        ax = axes[row][0]
        ax.hist(values, bins=np.linspace(0, 1, 21), color="0.55", edgecolor="white")
        ax.axvline(values.mean(), color="black", linestyle="--", linewidth=1, label=f"mean over classes {100 * values.mean():.1f} %")
        ax.axvline(micro, color=QUERY, linestyle=":", linewidth=1.4, label=f"R@1 over queries {100 * micro:.1f} %")
        ax.set_xlabel("per-class R@1")
        ax.set_ylabel("classes")
        ax.set_title(f"{_ranking_label(key)}: {len(values)} classes", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        worst = sorted(recall.items(), key=lambda item: (item[1][0], -item[1][1], item[0]))[:worst_n]
        ax = axes[row][1]
        ys = np.arange(len(worst))[::-1]
        ax.barh(ys, [v for _, (v, _) in worst], color=INCORRECT, alpha=0.75, hatch="//", edgecolor="white")
        ax.set_yticks(ys, [f"{names.get(c, c)[:28]} ({n} q)" for c, (_, n) in worst], fontsize=7)
        for y, (_, (v, _)) in zip(ys, worst):
            ax.text(v + 0.01, y, f"{100 * v:.0f} %", va="center", fontsize=7)
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("R@1")
        ax.set_title(f"the {len(worst)} worst classes", fontsize=9)
        data[key or "plain"] = {
            "recall_at_1": micro, "mean_over_classes": float(values.mean()),
            "classes": {names.get(c, str(c)): {"label": c, "recall_at_1": v, "queries": n} for c, (v, n) in sorted(recall.items())},
            "worst": [{"label": c, "name": names.get(c, str(c)), "recall_at_1": v, "queries": n} for c, (v, n) in worst],
        }
    fig.suptitle(f"{context.method}: per-class Recall@1 on the {evaluation.stage} split", fontsize=9)
    fixed_layout(fig, left=0.6, right=0.15, top=0.6, bottom=0.45, wspace=2.2, hspace=0.8)
    return FigureResult([context.save(fig, "per_class_recall")], data)


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


def _evaluations(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    path = run_dir / f"metrics_{stage}.json"
    try:
        return list(json.loads(path.read_text()).get("evaluations", []))
    except (OSError, ValueError, AttributeError):
        return []


def _metric_of(evaluation: Mapping[str, Any], group: str, metric: str) -> float | None:
    values = evaluation.get("metrics", {}) if not group else evaluation.get("refined", {}).get(group, {})
    value = values.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _split_metric(name: str) -> tuple[str, str, str]:
    """``val/refined/R@1`` -> (``val``, ``refined``, ``R@1``)."""
    stage, _, rest = name.partition("/")
    group, _, metric = rest.rpartition("/")
    return stage, group, metric


@register_figure(
    "training_curves",
    "loss terms and validation metrics against epoch, the checkpoint's selection metric marked",
    after_test=True,
    evaluation=False,
)
def training_curves(context: FigureContext) -> FigureResult:
    plt = pyplot()
    run_dir = context.run_dir
    if run_dir is None:
        raise ValueError("training_curves draws from a run directory (--ckpt of a run's checkpoints/).")
    history, source = read_training_history(run_dir)
    vals, tests = _evaluations(run_dir, "val"), _evaluations(run_dir, "test")
    if not history and not vals and not tests:
        raise FigureSkipped(f"{run_dir} holds no training history and no evaluation")
    selection = context.selection_metric or "val/R@1"
    mode = str(getattr(context.model, "selection_mode", "max") or "max")
    _, sel_group, sel_metric = _split_metric(selection)
    # global step -> epoch, from the training history (a validation after epoch e sits at e + 1)
    steps = history.get("train/loss@step", (np.zeros(0), np.zeros(0)))[0]
    epochs = history.get("train/loss", (np.zeros(0), np.zeros(0)))[0]

    def epoch_of(evaluation: Mapping[str, Any]) -> float:
        # a `test --ckpt_path` runs at step 0 of a fresh trainer: its weights are the checkpoint's step
        step = float((evaluation.get("checkpoint") or {}).get("global_step") or evaluation.get("global_step") or 0)
        if not len(steps):
            return float(evaluation.get("epoch") or 0) + (1.0 if step > 0 else 0.0)
        if step <= steps[-1]:
            return float(np.interp(step, np.r_[0.0, steps], np.r_[0.0, epochs]))
        return float(epochs[-1] + (step - steps[-1]) * epochs[-1] / max(steps[-1], 1.0))  # beyond the history

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    terms = sorted(n for n in history if not n.endswith("@step") and n != "train/grad_norm")
    drawn_terms = []
    for name in ["train/loss"] + [t for t in terms if t != "train/loss"]:
        if name not in history:
            continue
        x, y = history[name]
        ax_loss.plot(x, y, linewidth=1.6 if name == "train/loss" else 0.9, label=name.removeprefix("train/"),
                     color="black" if name == "train/loss" else None, alpha=1.0 if name == "train/loss" else 0.85)
        drawn_terms.append(name)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title(f"training loss terms ({source})", fontsize=9)
    if drawn_terms:
        ax_loss.legend(fontsize=7, frameon=False)
        ys = np.concatenate([history[n][1] for n in drawn_terms])
        if np.all(ys > 0) and ys.max() / max(ys.min(), 1e-12) > 100:
            ax_loss.set_yscale("log")
    else:
        ax_loss.text(0.5, 0.5, "no training history in this run\n(figures off, or evaluated only)", ha="center",
                     va="center", transform=ax_loss.transAxes, fontsize=8)
    groups = [g for g in ["", "refined", sel_group] if g == "" or any(g in e.get("refined", {}) for e in vals)]
    groups = list(dict.fromkeys(groups))  # plain, refined, and the selection metric's group
    best: dict[str, Any] = {}
    series_out: dict[str, Any] = {}
    for group in groups:
        for metric, style in (("R@1", "-"), ("MAP@R", "--")):
            points = [(epoch_of(e), _metric_of(e, group, metric)) for e in vals]
            points = [(x, y) for x, y in points if y is not None]
            if not points:
                continue
            name = f"val/{group + '/' if group else ''}{metric}"
            selected = group == sel_group and metric == sel_metric
            xs, ys = zip(*points)
            ax_val.plot(xs, ys, style, marker="o", markersize=3.5 if not selected else 5.5,
                        linewidth=2.2 if selected else 1.0, label=name + ("  (selects the checkpoint)" if selected else ""),
                        color="black" if selected else None, zorder=3 if selected else 2)
            series_out[name] = {"epochs": list(xs), "values": list(ys)}
            if selected:
                i = int(np.argmax(ys) if mode == "max" else np.argmin(ys))
                best = {"metric": name, "value": ys[i], "epoch": xs[i], "mode": mode}
                ax_val.scatter([xs[i]], [ys[i]], marker="*", s=180, color="gold", edgecolor="black", zorder=4,
                               label=f"best {name} {100 * ys[i]:.1f} % at epoch {xs[i]:.2g}")
    for e in tests:
        value = _metric_of(e, sel_group, sel_metric)
        if value is not None:
            ax_val.scatter([epoch_of(e)], [value], marker="D", s=36, color=INCORRECT, edgecolor="black", zorder=4,
                           label=f"test/{sel_group + '/' if sel_group else ''}{sel_metric}" if e is tests[0] else None)
            series_out.setdefault(f"test/{sel_group + '/' if sel_group else ''}{sel_metric}", []).append(
                {"epoch": epoch_of(e), "value": value, "checkpoint": (e.get("checkpoint") or {}).get("selected_by")})
    if not vals and not tests:
        ax_val.text(0.5, 0.5, "no evaluation recorded yet", ha="center", va="center", transform=ax_val.transAxes, fontsize=8)
    ax_val.set_xlabel("epoch")
    ax_val.set_title(f"validation (checkpoint selected by {selection}, {mode})", fontsize=9)
    if ax_val.get_legend_handles_labels()[0]:
        ax_val.legend(fontsize=6.5, frameon=False)
    fig.suptitle(f"{context.method}: {run_dir.name}", fontsize=9)
    fixed_layout(fig, left=0.6, right=0.15, top=0.6, bottom=0.45, wspace=0.6)
    data = {"source": source, "selection_metric": selection, "best": best, "validation": series_out,
            "training_terms": [n.removeprefix("train/") for n in drawn_terms],
            "validations": len(vals), "tests": len(tests)}
    return FigureResult([context.save(fig, "training_curves")], data)


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
    ) -> None:
        super().__init__()
        bad = [f"{n}={v}" for n, v in (("top_k", top_k), ("max_classes", max_classes), ("max_points", max_points),
                                       ("dpi", dpi)) if v < 1]
        bad += [f"{n}={v}" for n, v in (("queries", queries), ("worst_queries", worst_queries)) if v < 0]
        if bad:
            raise ValueError(f"--figures: {', '.join(bad)} out of range (sizes >= 1, query counts >= 0).")
        self.enabled, self.names = bool(enabled), list(names) if names else None
        self.settings = FigureSettings(top_k, queries, worst_queries, max_classes, max_points, seed, dpi)
        self.run_dir: Path | None = None  # set by the CLI; else the trainer's default_root_dir
        self.results: dict[str, FigureResult] = {}
        self.seconds = 0.0
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
        context = FigureContext(
            out_dir=self._dir(trainer) / FIGURES_DIR, evaluation=evaluation, model=pl_module,
            datamodule=getattr(trainer, "datamodule", None), run_dir=self._dir(trainer), settings=self.settings,
            selection_metric=selection_metric(trainer, pl_module), trainer=trainer,
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(tight_layout|Glyph).*")
            self.results = draw_figures(figures, context, strict=False)
        paths = [p for r in self.results.values() for p in r.paths]
        log_images(trainer, paths)
        self.seconds = time.perf_counter() - start
        if paths:
            share = f", {100 * self.seconds / evaluation.seconds:.0f} % of the test's {evaluation.seconds:.1f}s" if evaluation.seconds else ""
            print(f"[benchmark] figures: {', '.join(self.results)} -> {context.out_dir} ({self.seconds:.1f}s{share})",
                  file=sys.stderr)


def selection_metric(trainer: Any, pl_module: Any) -> str:
    """The metric the run's best checkpoint is chosen by (the checkpoint callback's, else the method's)."""
    callback = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
    monitor = getattr(callback, "monitor", None)
    return str(monitor or getattr(pl_module, "selection_metric", "val/R@1"))
