"""The figure layer: figures every run and every method gets, and the means to add more.

A figure is a function ``draw(context) -> FigureResult`` registered with
``@register_figure(name, summary, ...)`` (:mod:`benchmark.core.contracts`) in the module that owns it:
the four generic figures below, a method's own in ``methods/<method>_analysis.py``. Every
registered figure is a command, ``python -m benchmark analyze NAME --ckpt PATH``
(:mod:`benchmark.app.analysis` rebuilds the run from its checkpoint, evaluates it once and draws);
the ``after_test`` ones are also drawn by :class:`FigureWriter`, the callback the CLI adds to
``fit`` and ``test``, into ``runs/<run>/figures/`` after every test (``--figures false`` turns
it off), and logged to W&B as images when W&B is the logger.

The figures draw what the evaluation scored, not a second computation of it: the
:class:`~benchmark.engine.evaluation.RetrievalEvaluator` keeps its last test evaluation (embeddings,
labels, query/gallery flags, dataset indices, the method's refined outputs and the metrics),
and the rankings shown are those of :func:`~benchmark.engine.evaluation.metrics.query_rankings` (the
metrics' scores and tie rule) or the method's own ranked lists.

Generic figures (``after_test``):

* ``retrieval_grid``: for a seeded sample of queries and the worst queries by first-positive
  rank, the query and its top-k gallery images, each marked correct (solid green border, ✓) or
  incorrect (dashed red border, ✗), with the similarity under it; one file per ranking
  (plain, and refined when the method refines);
* ``embedding_map``: a 2-D t-SNE map (openTSNE) of the test embeddings coloured by class
  (a seeded subset of classes and points); for a method whose refinement returns embeddings,
  before and after refinement on one projection fitted to both;
* ``per_class_recall``: the distribution of per-class R@1 and the worst classes by name (or,
  where they tie, how many share the value);
* ``training_curves``: the loss terms and the validation metrics against epochs trained, from the
  run's files (``figures/training_history.csv`` recorded by :class:`FigureWriter`, else the CSV
  logger's ``metrics.csv``; ``metrics_val.json``, ``metrics_test.json``), with the best
  validation by the checkpoint's selection metric marked (:func:`benchmark.core.results.best_validation`).

Conventions shared by every figure: metrics in percent on axes and in captions (the JSON keeps the
recorded fractions), epochs as :func:`benchmark.core.results.epochs_trained` counts them (0 = before
training), short series drawn with markers, class names shortened at word boundaries. After a
run's test the figures' time is bounded by a share of the run's evaluation time
(``--figures.budget``, 10 %): a figure starts only while the time left covers one (else it is
skipped and named), and the embedding map, drawn last, fits its t-SNE to what is left.

Everything is headless (matplotlib's Agg backend, the DejaVu fonts matplotlib ships) and
deterministic for a given checkpoint and seed (seeded samples; a seeded t-SNE on one thread),
the embedding map for a given t-SNE schedule, which its JSON records (``analyze`` always runs the
full one).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from benchmark.core.contracts import FIGURES, Figure, RankedLists, logs_this_step, register_figure
from benchmark.core.io import atomic_write_text
from benchmark.core.results import OPTIMISTIC, RecordError, best_validation, epochs_trained, read_record
from benchmark.engine.evaluation.callback import Evaluation, RetrievalEvaluator
from benchmark.engine.evaluation.metrics import QueryRankings, query_rankings, ranked_list_rankings
from benchmark.engine.plotting import fixed_layout, point_markers, pyplot

FIGURES_DIR = "figures"
HISTORY_FILE = "training_history.csv"  # in <run>/figures/: the training curves' data
CORRECT, INCORRECT, QUERY = "#1a9850", "#d73027", "#2c7bb6"  # green, red, blue
MARKS = {True: "\u2713", False: "\u2717"}  # ✓ ✗ (DejaVu Sans has both)
ELLIPSIS = "\u2026"  # … (DejaVu Sans has it)
WORD_SEPARATORS = " _-./"  # where a class name may be shortened: "001.Black_footed_Albatross" -> "001.Black_footed…"
#: Figures whose cost adapts to the time left in the figures' budget; :class:`FigureWriter` draws them last.
ADAPTIVE = ("embedding_map",)
#: zlib level of the PNG files: 1 instead of Pillow's 6 (the main job's retrieval grid encodes in 0.06 s
#: instead of 0.10 s and is 10 % larger, 1.2 MB; the matplotlib figures barely change).
PNG_COMPRESSION = 1


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
    budget: float | None = 0.1  # the after-test figures' share of the run's evaluation time (None: no limit)


class FigureSkipped(Exception):
    """Raised by a figure that has nothing to draw here (said in one line, no file written)."""


@dataclass
class FigureResult:
    """The files a figure wrote and the data it drew (also written as ``<name>.json``)."""

    paths: list[Path]
    data: dict[str, Any] = field(default_factory=dict)


def shorten(text: str, width: float, measure: Callable[[str], float] = len) -> str:
    """``text`` if it fits in ``width``, else its longest prefix that ends at a word boundary
    (:data:`WORD_SEPARATORS`), the separator dropped, followed by an ellipsis.

    ``width`` is in ``measure``'s units: characters (``len``, the default) or pixels of a font
    (``font.getlength``). Class names are shortened this way wherever they are drawn, so that a
    label never ends in the middle of a word; only a first word longer than the whole room is cut
    inside the word (there is no boundary to cut at).
    """
    if measure(text) <= width:
        return text
    for end in range(len(text) - 1, 0, -1):
        if text[end] in WORD_SEPARATORS:
            candidate = text[:end].rstrip(WORD_SEPARATORS) + ELLIPSIS
            if candidate != ELLIPSIS and measure(candidate) <= width:
                return candidate
    for end in range(len(text) - 1, 0, -1):  # one long word
        if measure(text[:end] + ELLIPSIS) <= width:
            return text[:end] + ELLIPSIS
    return ELLIPSIS


def set_title(ax: Any, text: str, fontsize: float) -> None:
    """``ax.set_title`` at a fixed height: matplotlib otherwise places a title above whatever tick labels
    the axes has on top, measuring them at every draw (0.23 s of the four after-test figures' 2.0 s in
    a profile of the main job's)."""
    ax.set_title(text, fontsize=fontsize, y=1.0)


def plain_log_labels(axis: Any) -> None:
    """Tick labels of a log axis as plain numbers (``0.01``, ``10``): matplotlib's default writes
    ``10^k`` in mathtext, whose parser took 0.11 s of the main job's training curves (profiled)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


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
        deadline: a ``time.perf_counter()`` time by which the figures should be done (the budget
            :class:`FigureWriter` sets after a run's test); None: no limit (``analyze``).
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
    deadline: float | None = None
    drawn_seconds: list[float] = field(default_factory=list)  # what each figure drawn so far took
    skipped: list[str] = field(default_factory=list)  # the figures skipped for time
    _rankings: dict[str, QueryRankings] = field(default_factory=dict, repr=False)
    _thumbs: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _names: dict[int, str] | None = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return int(self.settings.seed)

    @property
    def method(self) -> str:
        return str(getattr(self.model, "method_name", "") or type(self.model).__name__) if self.model is not None else ""

    def seconds_left(self) -> float | None:
        """Seconds left until :attr:`deadline` (at least 0), or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())

    def checkpoint_hint(self) -> str:
        """The checkpoint an ``analyze`` command would redraw these figures from: the one tested, else
        the run's ``last.ckpt`` (a fit tests the weights in memory, which the paper protocol saves last)."""
        tested = getattr(self.trainer, "ckpt_path", None) if self.trainer is not None else None
        if tested:
            return str(tested)
        return str(self.run_dir / "checkpoints" / "last.ckpt") if self.run_dir is not None else "CKPT"

    def expected_seconds(self) -> float | None:
        """What a figure is expected to take here: the mean of those drawn so far (None before the
        first). The after-test figures cost about the same (0.12-0.25 s each on the main job, the
        embedding map's drawing without its projection 0.1 s)."""
        return float(np.mean(self.drawn_seconds)) if self.drawn_seconds else None

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
        fig.savefig(path, dpi=self.settings.dpi, metadata={"Software": None}, pil_kwargs={"compress_level": PNG_COMPRESSION})
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
            if 0 <= idx < len(paths):  # os.path: a Path per sample was 0.03 s of 3,000 test images
                folders.setdefault(int(lab), set()).add(os.path.basename(os.path.dirname(str(paths[idx]))))
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


#: t-SNE schedules (early-exaggeration + normal iterations), the full one first: under a time budget the
#: longest that fits is run (each a fixed schedule, so a given one always gives the same map).
TSNE_SCHEDULES = ((100, 200), (50, 100), (25, 50))
_TSNE_CHUNK = 10  # iterations between clock checks (the first chunk also measures an iteration's cost)


@dataclass(frozen=True)
class Projection:
    """A 2-D projection and how it was made.

    Attributes:
        coords: (n, 2) positions.
        method: its name as captions show it (``t-SNE (openTSNE)``, ``t-SNE (openTSNE, 50 + 100
            iterations)``, ``PCA``).
        iterations: the t-SNE's early-exaggeration and normal iterations run; None for PCA.
        seconds: what it took, the openTSNE import included.
        note: why it is not the full t-SNE (a time budget, too few points); "" when it is.
    """

    coords: np.ndarray
    method: str
    iterations: tuple[int, int] | None
    seconds: float
    note: str = ""


def project_2d(points: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """(n, D) -> (n, 2) by the full t-SNE schedule (see :func:`project`), and the method's name."""
    projection = project(points, seed)
    return projection.coords, projection.method


def project(points: np.ndarray, seed: int, seconds: float | None = None) -> Projection:
    """(n, D) -> 2-D by t-SNE (openTSNE: Barnes-Hut, exact neighbours, PCA initialisation, seeded:
    the same input and schedule give the same map), within ``seconds`` when given.

    It runs on one thread. Two threads were faster on an idle machine (0.65 s against 1.0 s for
    the main job's 600 points), but under contention, on a machine that runs something else or
    in the fit's process where the evaluation's threads may still hold the cores, openTSNE's
    threads wait on each other: 290 iterations of 600 points took 6.3-7.9 s on 2 threads against
    0.39 s on one (2-core AMD EPYC, load average 3.4). That was the smoke cells' 15-20 s map.

    A short schedule (100 early-exaggeration + 200 iterations; openTSNE's default is 250 + 500)
    keeps a 600-point map near half a second: on the main job's 600 test embeddings the final KL
    divergence is 0.529, against 0.519 with 125 + 300 and 0.520 with the default (2-core AMD
    EPYC: 0.69 s, 0.99 s, 1.59 s).

    The time budget: the first 10 iterations measure an iteration's cost on this machine, now;
    the longest of :data:`TSNE_SCHEDULES` whose predicted time fits in ``seconds`` is run, and
    when none fits, PCA (a few milliseconds) is used and the note says why. The optimisation also
    stops at ``seconds`` should the machine slow down on the way (a loaded machine once took
    15-20 s for this map), and says so. Fewer than 12 points, or without openTSNE, PCA is used
    and named.
    """
    start = time.perf_counter()
    x = np.asarray(points, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # the cosine geometry the metrics use
    if len(x) < 12:
        return _pca(x, start, "")
    if seconds is not None and seconds <= 0:
        return _pca(x, start, "PCA: no time left in the figures' time budget for a t-SNE")
    try:
        from openTSNE import TSNE
        from openTSNE.affinity import PerplexityBasedNN
        from openTSNE.nearest_neighbors import PrecomputedNeighbors
    except ImportError:
        return _pca(x, start, "", name="PCA (openTSNE not installed)")
    full = TSNE_SCHEDULES[0]
    perplexity = float(min(30.0, (len(x) - 1) / 3.5))
    tsne = TSNE(
        n_components=2, perplexity=perplexity, n_iter=full[1], early_exaggeration_iter=full[0],
        negative_gradient_method="bh", initialization="pca", random_state=int(seed), n_jobs=1, verbose=False,
    )
    # The exact neighbours openTSNE's "exact" option finds (3 x perplexity of them), from one matrix
    # product: scikit-learn's search took 0.14 s of the main job's 0.17 s of preparation.
    neighbours = PrecomputedNeighbors(*exact_neighbours(x, min(len(x) - 1, int(3 * perplexity))))
    affinities = PerplexityBasedNN(knn_index=neighbours, perplexity=perplexity, verbose=False)
    embedding = tsne.prepare_initial(x, affinities=affinities)
    spent = time.perf_counter() - start
    if seconds is not None and spent >= seconds:  # not even one chunk of iterations fits
        return _pca(x, start, f"PCA: preparing a t-SNE (import, affinities) took {spent:.2f} s, the "
                              f"{seconds:.2f} s left in the figures' time budget")
    # openTSNE's own fit() runs these two phases in one call each; in chunks, the optimiser keeps its
    # state between calls, so a schedule gives the same map however it is chunked (to 1e-9).
    phases = ((tsne.early_exaggeration, tsne.initial_momentum), (tsne.exaggeration, tsne.final_momentum))

    def step(phase: int, n_iter: int) -> None:
        exaggeration, momentum = phases[phase]
        embedding.optimize(n_iter=n_iter, exaggeration=exaggeration, momentum=momentum, inplace=True,
                           propagate_exception=True)

    chunk_start = time.perf_counter()
    step(0, _TSNE_CHUNK)
    per_iteration = (time.perf_counter() - chunk_start) / _TSNE_CHUNK
    schedule = full if seconds is None else tsne_schedule(time.perf_counter() - start, per_iteration, seconds)
    if schedule is None:
        shortest = time.perf_counter() - start + per_iteration * (sum(TSNE_SCHEDULES[-1]) - _TSNE_CHUNK)
        return _pca(x, start, f"PCA: the shortest t-SNE ({' + '.join(map(str, TSNE_SCHEDULES[-1]))} iterations) "
                              f"would take {shortest:.2f} s, over the {seconds:.2f} s left in the figures' time budget")
    done = [_TSNE_CHUNK, 0]
    stopped = False
    for phase in (0, 1):
        while done[phase] < schedule[phase] and not stopped:
            # every call ends with one more evaluation of the objective: longer chunks from here on
            n_iter = min(2 * _TSNE_CHUNK + 5, schedule[phase] - done[phase])
            step(phase, n_iter)
            done[phase] += n_iter
            stopped = seconds is not None and time.perf_counter() - start > seconds
    ran = (done[0], done[1])
    name = "t-SNE (openTSNE)" if ran == full else f"t-SNE (openTSNE, {ran[0]} + {ran[1]} iterations)"
    if stopped and ran != schedule:
        note = (f"t-SNE stopped at the figures' time budget ({seconds:.2f} s) after {ran[0]} + {ran[1]} of "
                f"{schedule[0]} + {schedule[1]} iterations: the machine slowed down")
    elif schedule != full:
        note = (f"t-SNE shortened to {schedule[0]} + {schedule[1]} of {full[0]} + {full[1]} iterations to fit the "
                f"figures' time budget ({seconds:.2f} s left); `analyze embedding_map` draws the full one")
    else:
        note = ""
    return Projection(np.asarray(embedding), name, ran, time.perf_counter() - start, note)


def exact_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows of unit-length ``x`` by euclidean distance, (indices, distances),
    nearest first, ties to the lower index (a stable sort of one distance matrix)."""
    squared = np.maximum(2.0 - 2.0 * (x @ x.T), 0.0)  # |a - b|^2 of unit vectors
    np.fill_diagonal(squared, np.inf)
    order = np.argsort(squared, axis=1, kind="stable")[:, :k]
    return order, np.sqrt(np.take_along_axis(squared, order, axis=1))


def tsne_schedule(spent: float, per_iteration: float, seconds: float) -> tuple[int, int] | None:
    """The longest of :data:`TSNE_SCHEDULES` that ends within ``seconds``, given the ``spent`` seconds
    (import, affinities, the first 10 iterations) and an iteration's measured cost; None if none does."""
    for schedule in TSNE_SCHEDULES:
        if spent + per_iteration * (sum(schedule) - _TSNE_CHUNK) <= seconds:
            return schedule
    return None


def _pca(x: np.ndarray, start: float, note: str, name: str = "PCA") -> Projection:
    """The first two principal components of ``x``, in a deterministic orientation."""
    if len(x) < 2:
        return Projection(np.zeros((len(x), 2)), name, None, time.perf_counter() - start, note)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[:2].T
    if proj.shape[1] < 2:
        proj = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
    signs = np.sign(proj[np.abs(proj).argmax(axis=0), range(2)])
    return Projection(proj * np.where(signs == 0, 1, signs), name, None, time.perf_counter() - start, note)


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
    names = context.class_names()
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
        # the query's class by name, shortened at a word boundary to the cell's width
        query_caption = shorten(names.get(qlabel, f"class {qlabel}"), cell + gap, font_small.getlength)
        draw.text((x + cell / 2, y + cell + border + 1), query_caption, fill="black", font=font_small, anchor="ma")
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
        panels.append({"kind": kind, "query": int(indices[qpos]), "label": qlabel, "caption": query_caption,
                       "first_positive_rank": first + 1,
                       "beyond_list": beyond, "neighbours": neighbours})
    path = context.path(stem)
    image.save(path, dpi=(dpi, dpi), compress_level=PNG_COMPRESSION)
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
    all sets together (sets of different sizes are projected separately, and say so).

    Under a time budget (``context.deadline``) the projection gets the time left less what drawing
    the map is expected to take (:meth:`FigureContext.expected_seconds`: its scatter, legend and PNG
    cost about what another figure does) and shortens its t-SNE, or falls back to PCA, to fit
    (:func:`project`); the caption and the JSON (``projection``, ``iterations``,
    ``projection_note``, ``time_budget_seconds``) say what ran.
    """
    plt = pyplot()
    evaluation = context.require_evaluation()
    settings = context.settings
    labels = evaluation.labels.numpy()
    per_set = max(10, settings.max_points // len(sets))
    picked = sample_points(labels, settings.max_classes, per_set, context.seed)
    dims = {int(v.shape[1]) for _, v in sets}
    left = context.seconds_left()
    budget = None if left is None else max(0.0, left - (context.expected_seconds() or 0.0))
    if len(dims) == 1:
        projections = [project(np.concatenate([v[picked].numpy() for _, v in sets]), context.seed, budget)]
        coords = np.split(projections[0].coords, len(sets))
        method = projections[0].method
        shared = f"one {method} map of all {len(sets)} sets" if len(sets) > 1 else method
    else:
        projections = [project(v[picked].numpy(), context.seed, None if budget is None else budget / len(sets))
                       for _, v in sets]
        coords, method = [p.coords for p in projections], projections[0].method
        shared = f"{method}, each set projected separately (dimensions differ)"
    notes = list(dict.fromkeys(p.note for p in projections if p.note))
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
        set_title(ax, name, 9)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xticks([])
        ax.set_yticks([])
    shown = sorted(colours)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[c], markersize=4,
                          label=shorten(names.get(c, str(c)), 22)) for c in shown[:20]]
    axes[0][-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6, frameon=False,
                       title=f"{len(shown)} classes" + (" (20 listed)" if len(shown) > 20 else ""), title_fontsize=7)
    caption = "\n".join([title, f"{len(picked)} points of {len(shown)} of {len(np.unique(labels))} classes "
                                 f"(seed {context.seed}); {shared}", *notes])
    fig.suptitle(caption, fontsize=8)
    fixed_layout(fig, left=0.15, right=1.45, top=0.75 + 0.14 * len(notes), bottom=0.15, wspace=0.25)
    path = context.save(fig, stem)
    data = {
        "projection": method, "shared_projection": len(dims) == 1, "seed": context.seed,
        "iterations": [list(p.iterations) if p.iterations else None for p in projections],
        "projection_seconds": round(sum(p.seconds for p in projections), 3),
        "time_budget_seconds": None if budget is None else round(budget, 3),
        "projection_note": "; ".join(notes),
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


def worst_classes(recall: Mapping[int, tuple[float, int]], count: int) -> tuple[list[tuple[int, float, int]], dict[str, Any] | None]:
    """The worst classes that can be told apart from the rest, and the tie that ends the list.

    Sorted by R@1, then by more queries (the surer number) and label. When the ``count``-th and the
    next class have the same R@1, which of the tied classes make the list would be arbitrary: the
    list then stops before the tie, and the tie is returned instead (``{"recall_at_1": value,
    "classes": how many share it}``); when every class has the same R@1 the list is empty and the
    tie holds all of them. Returns ``([(label, R@1, queries), ...], tie or None)``.
    """
    ranked = sorted(((c, v, n) for c, (v, n) in recall.items()), key=lambda item: (item[1], -item[2], item[0]))
    if len(ranked) > 1 and ranked[0][1] == ranked[-1][1]:
        return [], {"recall_at_1": ranked[0][1], "classes": len(ranked)}
    if len(ranked) <= count or ranked[count][1] != ranked[count - 1][1]:
        return ranked[:count], None
    cut = ranked[count - 1][1]
    return [r for r in ranked if r[1] < cut], {"recall_at_1": cut, "classes": sum(1 for r in ranked if r[1] == cut)}


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
        ax.hist(100 * values, bins=np.linspace(0, 100, 21), color="0.55", edgecolor="white")
        ax.axvline(100 * values.mean(), color="black", linestyle="--", linewidth=1,
                   label=f"mean over classes {100 * values.mean():.1f} %")
        ax.axvline(100 * micro, color=QUERY, linestyle=":", linewidth=1.4, label=f"R@1 over queries {100 * micro:.1f} %")
        ax.set_xlabel("per-class R@1 (%)")
        ax.set_ylabel("classes")
        set_title(ax, f"{_ranking_label(key)}: {len(values)} classes", 9)
        ax.legend(fontsize=7, frameon=False)
        worst, tie = worst_classes(recall, worst_n)
        ax = axes[row][1]
        bars = [(f"{shorten(names.get(c, str(c)), 28)} ({n} q)", v, False) for c, v, n in worst]
        if tie is not None:  # the tied classes as one bar: listing some of them would be arbitrary
            everyone = tie["classes"] == len(recall)
            bars.append((f"all {tie['classes']} classes" if everyone else f"{tie['classes']} classes tied", tie["recall_at_1"], True))
        ys = np.arange(len(bars))[::-1]
        ax.barh(ys, [100 * v for _, v, _ in bars], color=[("0.6" if tied else INCORRECT) for _, _, tied in bars],
                alpha=0.75, hatch="//", edgecolor="white")
        ax.set_yticks(ys, [text for text, _, _ in bars], fontsize=7)
        for y, (_, v, _) in zip(ys, bars):
            ax.text(100 * v + 1, y, f"{100 * v:.1f} %", va="center", fontsize=7)
        ax.set_xlim(0, 110)
        ax.set_xlabel("R@1 (%)")
        if tie is not None and not worst:
            summary = (f"all {len(recall)} classes at {100 * tie['recall_at_1']:.1f} %" if tie["classes"] == len(recall)
                       else f"the worst: {tie['classes']} of {len(recall)} classes tied at {100 * tie['recall_at_1']:.1f} %")
        elif tie is not None:
            summary = f"the {len(worst)} worst classes, then {tie['classes']} tied at {100 * tie['recall_at_1']:.1f} %"
        else:
            summary = f"the {len(worst)} worst classes"
        set_title(ax, summary, 9)
        data[key or "plain"] = {
            "recall_at_1": micro, "mean_over_classes": float(values.mean()), "worst_summary": summary,
            "classes": {names.get(c, str(c)): {"label": c, "recall_at_1": v, "queries": n} for c, (v, n) in sorted(recall.items())},
            "worst": [{"label": c, "name": names.get(c, str(c)), "recall_at_1": v, "queries": n} for c, v, n in worst],
            "tied": tie,
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
