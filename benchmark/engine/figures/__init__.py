"""The figure layer: figures every run and every method gets, and the means to add more.

A figure is a function ``draw(context) -> FigureResult`` registered with
``@register_figure(name, summary, ...)`` (:mod:`benchmark.core.contracts`) in the module that owns it:
the four generic figures of this package, a method's own in ``companions/<method>_analysis.py``. Every
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

The package, a module per concern (this file re-exports the names the rest of the project uses):

* ``context``: :class:`FigureContext` (what every figure draws from), :class:`FigureSettings`,
  :class:`FigureResult`, :class:`FigureSkipped`, the shared colours and marks, the text helpers;
* ``retrieval_grid``, ``embedding_map`` (its t-SNE in ``projection``), ``per_class_recall``,
  ``training_curves``: the generic figures, one module each;
* ``writer``: :func:`draw_figures`, :func:`applicable`, :func:`log_images` and the callback
  :class:`FigureWriter`.

The figure modules are imported below in the order they register their figures, which is the
order the figures are drawn in (the adaptive embedding map moved last) and listed in
(``analyze --help``).
"""

from __future__ import annotations

from benchmark.engine.figures.context import (
    CORRECT,
    ELLIPSIS,
    FIGURES_DIR,
    INCORRECT,
    WORD_SEPARATORS,
    FigureContext,
    FigureResult,
    FigureSettings,
    FigureSkipped,
    shorten,
)

# In the order the figures register (retrieval grid, embedding map, per-class recall, training curves), not sorted:
# isort: off
from benchmark.engine.figures.retrieval_grid import retrieval_grid
from benchmark.engine.figures.embedding_map import draw_maps, embedding_map
from benchmark.engine.figures.projection import project, project_2d, tsne_schedule
from benchmark.engine.figures.per_class_recall import per_class_recall, worst_classes
from benchmark.engine.figures.training_curves import training_curves
from benchmark.engine.figures.writer import FigureWriter, applicable, draw_figures, log_images, selection_metric
# isort: on
from benchmark.engine.plotting import pyplot

__all__ = [
    "CORRECT", "ELLIPSIS", "FIGURES_DIR", "INCORRECT", "WORD_SEPARATORS", "FigureContext", "FigureResult",
    "FigureSettings", "FigureSkipped", "shorten", "retrieval_grid", "draw_maps", "embedding_map", "project",
    "project_2d", "tsne_schedule", "per_class_recall", "worst_classes", "training_curves", "FigureWriter",
    "applicable", "draw_figures", "log_images", "selection_metric", "pyplot",
]
