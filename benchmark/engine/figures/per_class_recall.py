"""The generic figure ``per_class_recall``: the distribution of per-class R@1, and the worst classes by name.

:func:`per_class_recall_at_1` gives each class's R@1 and :func:`worst_classes` the worst ones, the
list stopped before a tie so that no tied class is named arbitrarily; one row of panels per ranking
(plain, and refined when the method refines).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmark.core.contracts import register_figure
from benchmark.engine.evaluation.metrics import QueryRankings
from benchmark.engine.figures.context import (
    INCORRECT,
    QUERY,
    FigureContext,
    FigureResult,
    _ranking_label,
    set_title,
    shorten,
)
from benchmark.engine.plotting import fixed_layout, pyplot


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
