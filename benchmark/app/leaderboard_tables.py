"""The leaderboard's rows as text: the console table, CSV, Markdown and the HTML page.

Kept apart from :mod:`benchmark.app.leaderboard`, which reads the runs, groups them and computes the
rows (:func:`~benchmark.app.leaderboard.table_rows`); these functions only format what it computed.
The HTML page is filled into ``templates/leaderboard.html`` (:class:`string.Template`).
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmark.core.io import console as make_console
from benchmark.core.papers import PaperNumber
from benchmark.core.results import (
    OPTIMISTIC,
)

# Shown in every row (in this order); every other comparability field is shown only where it differs.
ROW_FIELDS = ("dataset", "protocol", "method", "backbone", "embedding_dim", "image_size")


def _fmt(mean: float | None, std: float | None) -> str:
    """``mean ± std`` with two decimals (percent), the mean alone for one seed, ``""`` for no value."""
    if mean is None:
        return ""
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def render_console(rows: list[dict[str, Any]], metrics: Sequence[str], rank_by: str, refs: list[PaperNumber],
                   per_seed: bool) -> None:  # fmt: skip
    """The console output: one rich table per dataset, the papers' numbers as dim reference rows.

    Args:
        rows, metrics, rank_by: as for :func:`table_rows`.
        refs: the reference rows (:func:`reference_rows`).
        per_seed: add one line per seed under each group with its ``rank_by`` value.
    """
    from rich.table import Table

    console = make_console()
    for dataset in sorted({str(r["dataset"]) for r in rows}):
        subset = [r for r in rows if str(r["dataset"]) == dataset]
        title = f"{dataset}: mean ± sample std over seeds (%), ranked by {rank_by}; number per run: {subset[0]['select']}"
        table = Table(title=title)
        columns = headers(metrics, rank_by)
        for col in columns:
            table.add_column(col)
        for r in subset:
            table.add_row(*_row_cells(r, metrics, rank_by))
            if per_seed:
                for seed, v in r[f"{rank_by}_per_seed"].items():
                    # The seed under the row's backbone, its value under the ranking metric's column
                    # (not always the first metric: --metrics R@1,MAP@R --metric MAP@R).
                    cells = [""] * len(columns)
                    cells[1], cells[columns.index(rank_by)] = f"seed {seed}", f"{v:.2f}"
                    table.add_row(*cells)
        for n in [n for n in refs if n.dataset == dataset]:
            table.add_row(*_paper_cells(n, metrics), style="dim")
        console.print(table)


def csv_columns(metrics: Sequence[str], rank_by: str) -> list[str]:
    """The columns of one group's row in the CSV output and the W&B Table."""
    return [*ROW_FIELDS, "n_seeds", "seeds", "steps", *[c for m in metrics for c in (f"{m}_mean", f"{m}_std")],
            f"paper_{rank_by}", "paper_statistic", f"{rank_by}_test_best_mean", f"{rank_by}_test_best_std", "paper",
            f"delta_{rank_by}", "select", "short", "incomplete", "differs", "comparison_group", "run_names"]  # fmt: skip


def _cell(value: Any) -> str:
    """A CSV cell: floats to 4 decimals, lists joined by ";", None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)


def to_csv(rows: list[dict[str, Any]], metrics: Sequence[str], rank_by: str) -> str:
    """The rows as CSV (:func:`csv_columns`, one line per group, cells by :func:`_cell`); the per-seed
    values are not in it (the JSON output and the console's ``--per-seed`` show them)."""
    columns = csv_columns(metrics, rank_by)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k)) for k in columns})
    return out.getvalue()


def headers(metrics: Sequence[str], rank_by: str) -> list[str]:
    """The columns every table format shows (one builder for console, Markdown and HTML).

    Beside the metrics: the paper's number with the statistic it reports, our test-best of the
    ranking metric (filled only where that statistic is ``test-best``, labelled optimistic), Δ, and
    the notes of :func:`_row_cells`.
    """
    return ["method", "backbone", "dim", "protocol", "seeds", "steps", *metrics, f"paper {rank_by} (statistic)",
            f"ours {rank_by} test-best ({OPTIMISTIC})", "Δ (final − paper)", "differs"]  # fmt: skip


def _row_cells(r: Mapping[str, Any], metrics: Sequence[str], rank_by: str) -> list[str]:
    """A group's cells in :func:`headers` order.

    The last cell gathers what a reader must know before comparing the row: why its runs are short,
    the states of incomplete runs, and the options that set it apart from its siblings.
    """
    paper, delta = r[f"paper_{rank_by}"], r[f"delta_{rank_by}"]
    notes = ", ".join(x for x in (r.get("short") and f"short: {r['short']}", r.get("incomplete") and
                                  f"incomplete: {r['incomplete']}", r["differs"]) if x)  # fmt: skip
    return [str(r["method"]), str(r["backbone"]), str(r["embedding_dim"]), str(r["protocol"]), str(r["n_seeds"]),
            "" if r.get("steps") is None else str(r["steps"]), *(_fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics),
            "" if paper is None else f"{paper:.1f} ({r['paper_statistic']})",
            _fmt(r.get(f"{rank_by}_test_best_mean"), r.get(f"{rank_by}_test_best_std")),
            "" if delta is None else f"{delta:+.2f}", notes]  # fmt: skip


def _paper_cells(n: PaperNumber, metrics: Sequence[str]) -> list[str]:
    """A paper's number as a reference row in :func:`headers` order (its value under the metric's column)."""
    values = [f"{n.value:.1f}" if m.split("/")[-1] == n.metric else "" for m in metrics]
    return [f"[paper] {n.method} ({n.paper} {n.table}: {n.row})", n.backbone, str(n.dim), "", "", "", *values,
            n.statistic, "", "", ""]  # fmt: skip


def to_markdown(rows: list[dict[str, Any]], metrics: Sequence[str], rank_by: str, refs: list[PaperNumber]) -> str:
    """The rows as Markdown: a ``###`` section per dataset with the rule in a sentence, then a table
    whose paper rows are in italics."""
    lines = []
    for dataset in sorted({str(r["dataset"]) for r in rows}):
        subset = [r for r in rows if str(r["dataset"]) == dataset]
        lines += [f"### {dataset}", "",
                  f"Mean ± sample std over seeds (%), ranked by {rank_by}; number per run: {subset[0]['select']}.", "",
                  "| " + " | ".join(headers(metrics, rank_by)) + " |",
                  "|" + "---|" * len(headers(metrics, rank_by))]  # fmt: skip
        for r in subset:
            lines.append("| " + " | ".join(_row_cells(r, metrics, rank_by)) + " |")
        for n in [n for n in refs if n.dataset == dataset]:
            lines.append("| " + " | ".join(f"*{c}*" if c else "" for c in _paper_cells(n, metrics)) + " |")
        lines.append("")
    return "\n".join(lines)


#: The page's HTML, CSS and sorting script; ``$title``, ``$sections`` and ``$figures`` are filled in.
HTML_TEMPLATE = Path(__file__).with_name("templates") / "leaderboard.html"


def to_html(rows: list[dict[str, Any]], metrics: Sequence[str], rank_by: str, refs: list[PaperNumber],
            figures: Sequence[Path], title: str = "DML benchmark leaderboard") -> str:  # fmt: skip
    """A self-contained page (``templates/leaderboard.html``): one sortable table per dataset (click a
    header) and the figures inline.

    Every value is HTML-escaped and the figures are embedded as base64 PNGs, so the page is one
    file that opens anywhere without the figures' folder.

    Args:
        rows, metrics, rank_by, refs: as for :func:`to_markdown`.
        figures: PNG files to embed (:func:`benchmark.app.leaderboard_figures.write_figures`).
        title: the page's title (``--title``).

    Returns:
        The page's HTML.
    """
    import html
    from string import Template

    columns = headers(metrics, rank_by)
    sections = []
    for dataset in sorted({str(r["dataset"]) for r in rows}):
        subset = [r for r in rows if str(r["dataset"]) == dataset]
        lines = [f"<h2>{html.escape(dataset)}</h2><p>Number per run: {html.escape(subset[0]['select'])}.</p>",
                 "<table><thead><tr>" + "".join(f"<th onclick='sortTable(this.closest(\"table\"),{i})'>{html.escape(h)}</th>"
                                                for i, h in enumerate(columns)) + "</tr></thead><tbody>"]  # fmt: skip
        lines += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _row_cells(r, metrics, rank_by)) + "</tr>"
                  for r in subset]  # fmt: skip
        lines += ["<tr class='paper'>" + "".join(f"<td>{html.escape(c)}</td>" for c in _paper_cells(n, metrics)) + "</tr>"
                  for n in refs if n.dataset == dataset]  # fmt: skip
        sections.append("\n".join([*lines, "</tbody></table>"]))
    images = [f"<figure><img src='data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()}' "
              f"alt='{html.escape(p.stem)}'><figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in figures]  # fmt: skip
    return Template(HTML_TEMPLATE.read_text()).substitute(title=html.escape(title), sections="\n".join(sections),
                                                          figures="\n".join(images))  # fmt: skip
