"""The generic figure ``retrieval_grid``: queries with their top-k gallery images, marked correct or not.

A seeded sample of queries and the worst by first-positive rank (:func:`sample_queries`), each
followed by its top-k gallery images: correct ones with a solid green border and a ✓, incorrect
ones with a dashed red border and a ✗, the similarity under each; one file per ranking (plain, and
refined when the method refines). Drawn with Pillow pixel for pixel, not with matplotlib, hence
its own fonts and dashed boxes, which no other figure uses.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.core.contracts import register_figure
from benchmark.engine.evaluation.metrics import QueryRankings
from benchmark.engine.figures.context import (
    CORRECT,
    INCORRECT,
    MARKS,
    PNG_COMPRESSION,
    QUERY,
    FigureContext,
    FigureResult,
    _ranking_label,
    shorten,
)


# ---------------------------------------------------------------------------- sampling
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
