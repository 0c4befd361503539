"""The leaderboard's figures (``leaderboard --figures DIR``, embedded in ``--format html``): the
ranking metric per group with error bars, Recall@K curves and validation curves over seeds.

Conventions shared with the run figures (:mod:`benchmark.engine.figures`): metrics in percent, epochs as
:func:`benchmark.core.results.epochs_trained` counts them (the groups' ``run.val_curve`` holds them),
short series drawn with markers, and one legend name per group: :attr:`Group.label
<benchmark.app.leaderboard.Group.label>`, made distinct where two groups would read the same
(:func:`distinct_labels`). Drawn on matplotlib's object-oriented API
(:func:`benchmark.engine.plotting.pyplot`): no backend switch, nothing left in a notebook's pyplot.

A light module: matplotlib is imported when a figure is made, and nothing here imports torch or
Lightning, so ``leaderboard --figures`` stays a light command. The groups are taken as they are
(:class:`benchmark.app.leaderboard.Group`, typed ``Any`` here to keep the import one-way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.core.io import atomic_path
from benchmark.engine.plotting import point_markers, pyplot

PAPER_LABEL = "the paper's number"  # the red tick on the ranking bars


def distinct_labels(labels: Sequence[str], settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """``labels``, each made unique where several are equal.

    Equal labels get the settings in which their groups differ (``[embedding_dim=64]``: a group's
    label names only the options that set it apart from its siblings, not the table's own
    columns), and where even those agree, ``#1``, ``#2``, ... in order.

    Args:
        labels: one legend name per group, in drawing order.
        settings: each group's settings (:attr:`Group.settings <benchmark.app.leaderboard.Group.settings>`),
            aligned with ``labels``.

    Returns:
        The labels, same order and length, no two equal.
    """
    out = list(labels)
    for label in dict.fromkeys(labels):
        same = [i for i, other in enumerate(labels) if other == label]
        if len(same) < 2:
            continue
        keys = sorted(set().union(*(settings[i] for i in same)), key=str)
        differ = [k for k in keys if len({repr(settings[i].get(k)) for i in same}) > 1]
        for i in same:
            extra = ", ".join(f"{k}={settings[i].get(k)}" for k in differ)
            out[i] = f"{label} [{extra}]" if extra else label
    # Second pass: labels still equal after the first (groups whose settings agree on every key)
    # are numbered, so that a legend never names two curves the same.
    for label in dict.fromkeys(out):
        same = [i for i, other in enumerate(out) if other == label]
        if len(same) > 1:
            for n, i in enumerate(same, start=1):
                out[i] = f"{label} #{n}"
    return out


def _group_names(family: Sequence[Any]) -> dict[int, str]:
    """id(group) -> its legend name among the groups drawn together."""
    names = distinct_labels([g.label for g in family], [g.settings for g in family])
    return {id(g): name for g, name in zip(family, names)}


def _row_name(row: Mapping[str, Any], family: Sequence[Any], names: Mapping[int, str]) -> str:
    """A table row's legend name: that of its group (same label, same values in the columns the row
    shares with the group's settings), so that a bar and a curve of one group read the same."""
    for g in family:
        if g.label == row.get("label") and all(row[k] == g.settings.get(k) for k in row.keys() & g.settings.keys()):
            return names[id(g)]
    return str(row.get("label"))


def leaderboard_figures(groups: Sequence[Any], rows: list[dict[str, Any]], rank_by: str,
                        select: str) -> dict[str, Any]:  # fmt: skip
    """The figures, by file stem (``ranking_<dataset>``, ``recall_at_k_<dataset>``,
    ``val_curve_<dataset>``), as matplotlib figures: the ranking bars with error bars per dataset,
    R@K curves (mean over seeds), validation curves (mean over seeds, min-max band or bar).

    Returned without saving (:func:`write_figures` saves them), so that a notebook can show or
    restyle them.

    Args:
        groups: the leaderboard's groups (:func:`benchmark.app.leaderboard.group_runs`).
        rows: their table rows (:func:`benchmark.app.leaderboard.table_rows`), values in percent.
        rank_by: the ranking metric (``R@1``, ``refined/R@1``, ``MAP@R`` ...).
        select: the number each run contributes (``final`` or ``test-best``), for the titles and
            the R@K means.

    Returns:
        ``{file stem: matplotlib Figure}``; a dataset gets a ranking only if a row has a mean, an
        R@K figure only if its runs report at least two K, a validation curve only if a run validated.
    """
    plt = pyplot()
    out: dict[str, Any] = {}
    for dataset in sorted({str(r["dataset"]) for r in rows}):
        family = [g for g in groups if str(g.settings.get("dataset")) == dataset]
        names = _group_names(family)
        subset = [r for r in rows if str(r["dataset"]) == dataset and r[f"{rank_by}_mean"] is not None]
        if subset:
            out[f"ranking_{dataset}"] = _ranking(plt, dataset, subset, family, names, rank_by, select)
        # The K values the runs measured (the dataset's Recall@K convention), from their final tests.
        ks = sorted({int(k[2:]) for g in family for run in g.runs for k in run.test if k.startswith("R@") and k[2:].isdigit()})
        if len(ks) > 1:
            out[f"recall_at_k_{dataset}"] = _recall_at_k(plt, dataset, family, names, ks, select)
        curve = _val_curve(plt, dataset, family, names, rank_by)
        if curve is not None:
            out[f"val_curve_{dataset}"] = curve
    return out


def _ranking(plt: Any, dataset: str, subset: list[dict[str, Any]], family: Sequence[Any], names: Mapping[int, str],
             rank_by: str, select: str) -> Any:  # fmt: skip
    """Bars of the rows' mean ``rank_by`` with ± one sample std, the paper's number as a red tick.

    Rows come ranked (best first) from the table; a row of one seed has no std: its error bar is zero.
    """
    # Wider with more groups, so that the rotated names stay readable.
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(subset) + 2), 3.6))
    means = [r[f"{rank_by}_mean"] for r in subset]
    stds = [r[f"{rank_by}_std"] or 0.0 for r in subset]
    ax.bar(range(len(subset)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ticked = False
    for i, r in enumerate(subset):
        if r[f"paper_{rank_by}"] is not None:  # the legend names the tick once, whichever bar has the first
            ax.plot([i - 0.4, i + 0.4], [r[f"paper_{rank_by}"]] * 2, color="tab:red", lw=2,
                    label=None if ticked else PAPER_LABEL)
            ticked = True
    if ticked:
        ax.legend(fontsize=7, frameon=False)
    ax.set_xticks(range(len(subset)), [_row_name(r, family, names) for r in subset], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{rank_by} (%)")
    ax.set_title(f"{dataset}: mean ± std over seeds ({select})", fontsize=9)
    return fig


def _recall_at_k(plt: Any, dataset: str, family: Sequence[Any], names: Mapping[int, str], ks: list[int],
                 select: str) -> Any:  # fmt: skip
    """Mean Recall@K over seeds against K, one line per group that reports every K in ``ks``."""
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for g in family:
        ys = [g.stats(f"R@{k}", select)[1] for k in ks]
        if all(y is not None for y in ys):
            ax.plot(ks, [100 * y for y in ys], marker="o", label=names[id(g)])
    # a log axis (K grows geometrically) with ticks at exactly the K values measured, as integers
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    # The log axis's own minor ticks (and their labels, e.g. 3x10^0) would crowd the K values.
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(ks[0] / 1.25, ks[-1] * 1.25)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title(f"{dataset}: Recall@K (mean over seeds)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return fig


def _val_curve(plt: Any, dataset: str, family: Sequence[Any], names: Mapping[int, str], rank_by: str) -> Any | None:
    """Validation ``rank_by`` against epochs trained: per group the mean over its runs, with the
    min-max band over seeds; None when no run of the dataset validated after training started.

    Runs that validated at different epochs are aligned on the union of their epochs; a run
    missing at an epoch is left out of that epoch's mean and band (NaN), not counted as zero.
    """
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    drawn = False
    for g in family:
        curves = [{e: m[rank_by] for e, m in run.val_curve if m.get(rank_by) is not None} for run in g.runs]
        epochs = sorted(set().union(*(c.keys() for c in curves)))
        if not epochs:
            continue
        # (runs, epochs), percent
        table = np.array([[c.get(e, np.nan) for e in epochs] for c in curves], dtype=float) * 100
        mean = np.nanmean(table, axis=0)
        line = ax.plot(epochs, mean, label=f"{names[id(g)]}, n={len(g.runs)}", **point_markers(len(epochs), 4.0))
        if len(g.runs) > 1:
            low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
            colour = line[0].get_color()
            if len(epochs) > 1:
                ax.fill_between(epochs, low, high, color=colour, alpha=0.2)
            else:  # a band over one epoch has no width: a bar
                ax.errorbar(epochs, mean, yerr=[mean - low, high - mean], color=colour, capsize=4, linestyle="none")
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("epochs trained")
    ax.set_ylabel(f"val/{rank_by} (%)")
    ax.set_title(f"{dataset}: validation {rank_by} (min-max over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def write_figures(groups: Sequence[Any], rows: list[dict[str, Any]], rank_by: str, select: str, out: Path) -> list[Path]:
    """PNGs of :func:`leaderboard_figures` in ``out`` (each written atomically); their paths.

    Args:
        groups, rows, rank_by, select: as for :func:`leaderboard_figures`.
        out: the folder (``--figures DIR``), created if missing; files of the same names are replaced.

    Returns:
        The paths written, in the order of :func:`leaderboard_figures` (the HTML page embeds them so).
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in leaderboard_figures(groups, rows, rank_by, select).items():
        fig.tight_layout()
        path = out / f"{stem}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")  # format given: the temporary's suffix is not .png
        paths.append(path)
    return paths
