"""Context-Refine's own figures, on the shared figure layer (:mod:`benchmark.engine.figures`).

``context_refine_drift``: the same seeded test points at ``e0`` (the frozen stage-1
embeddings), ``e^t`` (the middle level) and ``e^T`` (the last level) on one t-SNE fitted to the
three sets together, each point's move from the previous panel drawn as a grey line; the
mean cosine between ``e0`` and every level is recorded with it.

``context_refine_levels``: Recall@1 and MAP@R of ``e0``, of every level ``e^1 ... e^T`` and of
the output (the paper's Fig. 3), from the evaluation's own metrics.

Both draw from the test evaluation (``refine`` returns the levels at test time with
``--model.inference.report_levels true``, the default)::

    python -m benchmark analyze context_refine_drift --ckpt runs/<run>/checkpoints/last.ckpt
    python -m benchmark analyze context_refine_levels --ckpt runs/<run>/checkpoints/last.ckpt

Both are registered for the ``context_refine`` method only, and both refuse an evaluation
without levels with a message that names the option that turns them on.
"""

from __future__ import annotations

import re

import numpy as np
import torch.nn.functional as F

from benchmark.core.contracts import register_figure
from benchmark.engine.figures import FigureContext, FigureResult, draw_maps, pyplot

# The registered method name: the figures apply to its checkpoints only.
METHOD = "context_refine"


def levels_of(refined: dict[str, object]) -> list[int]:
    """The level numbers t of the ``level<t>`` entries ``refine`` returned, ascending.

    Returns:
        e.g. ``[1, 2, ..., 8]``; numeric order, so ``level10`` comes after ``level9``.
    """
    found = [int(m.group(1)) for key in refined if (m := re.fullmatch(r"level(\d+)", key))]
    return sorted(found)


def _require_levels(context: FigureContext) -> list[int]:
    """The refinement levels of the context's test evaluation.

    Raises:
        ValueError: the evaluation holds no levels (``report_levels false``, or no blocks);
            the figure layer reports it and draws the other figures.
    """
    levels = levels_of(context.require_evaluation().refined)
    if not levels:
        raise ValueError("The evaluation holds no refinement levels: the model was evaluated with "
                         "--model.inference.report_levels false (or has no blocks, refiner.type mean).")
    return levels


@register_figure(
    "context_refine_drift",
    "the same test points at e0, e^t and e^T on one t-SNE projection (drift through the refinement levels)",
    methods=(METHOD,),
)
def drift(context: FigureContext) -> FigureResult:
    """``context_refine_drift``: the same test points at ``e0``, the middle level and the last level.

    The projection is shared (:func:`benchmark.engine.figures.draw_maps` fits one map to all
    panels), so a point's position is comparable across panels and the grey trails show how far
    the refinement moved it. The JSON records the levels shown and, for every level, the mean
    cosine between a sample's ``e0`` and its embedding at that level (1: unchanged).
    """
    evaluation = context.require_evaluation()
    levels = _require_levels(context)
    last = levels[-1]
    # Three panels at most (e0, the middle level, the last), so the map stays readable with
    # T = 8 levels; with one level the middle panel is left out.
    middle = levels[(len(levels) - 1) // 2] if len(levels) > 1 else None
    shown = [0] + ([middle] if middle is not None and middle != last else []) + [last]
    sets = [(f"e{t}" + (" (initial)" if t == 0 else " (last level)" if t == last else ""),
             evaluation.embeddings if t == 0 else evaluation.refined[f"level{t}"]) for t in shown]
    # Cosines on normalised rows: retrieval ranks by cosine, so that is the drift that matters.
    e0 = F.normalize(evaluation.embeddings.float(), dim=1)
    cosine = {f"e{t}": float((e0 * F.normalize(evaluation.refined[f"level{t}"].float(), dim=1)).sum(1).mean())
              for t in levels}
    title = (f"{context.method}: drift through the refinement levels (grey: each point's move from the previous panel); "
             f"mean cos(e0, e{last}) = {cosine[f'e{last}']:.3f}")
    path, data = draw_maps(context, sets, "context_refine_drift", title, trails=True)
    data["levels"] = shown
    data["mean_cosine_to_e0"] = cosine
    return FigureResult([path], data)


@register_figure(
    "context_refine_levels",
    "R@1 and MAP@R of e0, every refinement level and the output (paper Fig. 3)",
    methods=(METHOD,),
)
def recall_by_level(context: FigureContext) -> FigureResult:
    """``context_refine_levels``: R@1 and MAP@R by refinement level, the paper's Fig. 3.

    Read from the evaluation's own metrics (``refined/level<t>/...``), never recomputed, so the
    figure shows the numbers ``metrics_test.json`` holds. A level without a metric is a gap.
    """
    plt = pyplot()
    evaluation = context.require_evaluation()
    levels = _require_levels(context)
    results = evaluation.results
    # x-axis labels and the result groups they read: "" is the initial (stage-1) embeddings,
    # "refined" the method's output.
    names = ["e0"] + [f"e{t}" for t in levels] + (["output"] if "refined" in results else [])
    groups = [""] + [f"refined/level{t}" for t in levels] + (["refined"] if "refined" in results else [])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(names) + 2.0), 3.4))
    data: dict[str, dict[str, float | None]] = {}
    x = np.arange(len(names))
    for metric, style in (("R@1", "-o"), ("MAP@R", "--s")):
        values = [results.get(g, {}).get(metric) for g in groups]
        data[metric] = dict(zip(names, values))
        ys = np.array([np.nan if v is None else 100 * v for v in values])
        ax.plot(x, ys, style, color="black" if metric == "R@1" else "0.5", label=metric, markersize=5)
        if metric == "R@1":  # R@1 values are written on the curve: the figure's main number
            for xi, yi in zip(x, ys):
                if np.isfinite(yi):
                    ax.annotate(f"{yi:.1f}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("percent")
    ax.set_xlabel("refinement level (e0: the stage-1 embeddings)")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(f"{context.method}: retrieval by refinement level, {evaluation.stage} split", fontsize=9)
    fig.tight_layout()
    return FigureResult([context.save(fig, "context_refine_levels")], {"levels": names, "metrics": data})

