"""What every figure draws from and returns: the figure context, the settings and results, the shared marks.

:class:`FigureContext` (the evaluation the metrics scored, the model, the datamodule's records, the
run directory, the settings and the time budget; its rankings, thumbnails and class names cached),
:class:`FigureSettings`, :class:`FigureResult` and :class:`FigureSkipped`; the colours, marks and
file settings every figure uses, and the text helpers (class names shortened at word boundaries,
titles placed without measuring). A module of its own because every figure builds on it, the
generic ones of this package and the companions' alike, and so does
:class:`~benchmark.engine.figures.writer.FigureWriter` that draws them: all import this base, none
imports another figure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.core.contracts import RankedLists
from benchmark.engine.evaluation.callback import Evaluation
from benchmark.engine.evaluation.metrics import QueryRankings, query_rankings, ranked_list_rankings
from benchmark.engine.plotting import pyplot

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


def _ranking_label(key: str) -> str:
    return "plain embeddings" if key == "" else f"{key} ranking"
