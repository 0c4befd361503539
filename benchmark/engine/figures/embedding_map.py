"""The generic figure ``embedding_map``: the test embeddings in 2-D, coloured by class.

:func:`draw_maps` draws one panel per set of embeddings (the plain ones, and a method's refined
embeddings) on one projection (:mod:`~benchmark.engine.figures.projection`) of a seeded sample of
classes and points (:func:`sample_points`); companions draw their own maps with it (Context-Refine's
refinement levels). It is the figure whose cost adapts to the time left in the figures' budget
(:data:`~benchmark.engine.figures.context.ADAPTIVE`), so it is drawn last.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.core.contracts import register_figure
from benchmark.engine.figures.context import FigureContext, FigureResult, set_title, shorten
from benchmark.engine.figures.projection import project
from benchmark.engine.plotting import fixed_layout, pyplot


# ---------------------------------------------------------------------------- sampling and colours
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


def class_colours(labels: Sequence[int]) -> dict[int, Any]:
    """A colour per class: tab20 (tab20 + tab20b beyond 20 classes, then cycling)."""
    plt = pyplot()
    palette = [plt.get_cmap("tab20")(i) for i in range(20)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    return {int(c): palette[i % len(palette)] for i, c in enumerate(sorted(set(int(c) for c in labels)))}


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
