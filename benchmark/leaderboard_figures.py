"""The leaderboard's figures (``leaderboard --figures DIR``, embedded in ``--format html``): the
ranking metric per group with error bars, Recall@K curves and validation curves over seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_figures(groups: Sequence[Any], rows: list[dict[str, Any]], rank_by: str, select: str, out: Path) -> list[Path]:
    """PNGs: ranking bars with error bars per dataset, R@K curves, validation curves (band over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig: Any, path: Path) -> Path:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def label(r: Mapping[str, Any]) -> str:
        return f"{r['method']} ({r['backbone']})" + (f" [{r['differs']}]" if r["differs"] else "")

    for dataset in sorted({str(r["dataset"]) for r in rows}):
        subset = [r for r in rows if str(r["dataset"]) == dataset and r[f"{rank_by}_mean"] is not None]
        if not subset:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(subset) + 2), 3.6))
        means = [r[f"{rank_by}_mean"] for r in subset]
        stds = [r[f"{rank_by}_std"] or 0.0 for r in subset]
        ax.bar(range(len(subset)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        for i, r in enumerate(subset):
            if r[f"paper_{rank_by}"] is not None:
                ax.plot([i - 0.4, i + 0.4], [r[f"paper_{rank_by}"]] * 2, color="tab:red", lw=2, label="paper" if i == 0 else None)
        ax.set_xticks(range(len(subset)), [label(r) for r in subset], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{rank_by} (%)")
        ax.set_title(f"{dataset}: mean ± std over seeds ({select})", fontsize=9)
        paths.append(save(fig, out / f"ranking_{dataset}.png"))

        family = [g for g in groups if str(g.settings.get("dataset")) == dataset]
        ks = sorted({int(k[2:]) for g in family for run in g.runs for k in run.test if k.startswith("R@") and k[2:].isdigit()})
        if len(ks) > 1:
            fig, ax = plt.subplots(figsize=(4.8, 3.6))
            for g in family:
                ys = [g.stats(f"R@{k}", select)[1] for k in ks]
                if all(y is not None for y in ys):
                    name = f"{g.settings.get('method')} ({g.settings.get('backbone')})"
                    ax.plot(ks, [100 * y for y in ys], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("K")
            ax.set_ylabel("Recall@K (%)")
            ax.set_title(f"{dataset}: Recall@K (mean over seeds)", fontsize=9)
            ax.legend(fontsize=7)
            paths.append(save(fig, out / f"recall_at_k_{dataset}.png"))

        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        drawn = False
        for g in [g for g in groups if str(g.settings.get("dataset")) == dataset]:
            curves = [{e: m[rank_by] for e, m in run.val_curve if m.get(rank_by) is not None} for run in g.runs]
            epochs = sorted(set().union(*(c.keys() for c in curves)))
            if not epochs:
                continue
            table = np.array([[c.get(e, np.nan) for e in epochs] for c in curves], dtype=float) * 100
            mean = np.nanmean(table, axis=0)
            line = ax.plot(epochs, mean, label=f"{g.settings.get('method')} ({g.settings.get('backbone')}, n={len(g.runs)})")
            if len(g.runs) > 1:
                low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
                ax.fill_between(epochs, low, high, color=line[0].get_color(), alpha=0.2)
            drawn = True
        if drawn:
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"val/{rank_by} (%)")
            ax.set_title(f"{dataset}: validation {rank_by} (band: min-max over seeds)", fontsize=9)
            ax.legend(fontsize=7)
            paths.append(save(fig, out / f"val_curve_{dataset}.png"))
        else:
            plt.close(fig)
    return paths
