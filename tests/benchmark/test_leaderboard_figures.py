"""The leaderboard's figures from real run directories of tiny one-epoch fits, checked against the runs'
own records: one legend name per group, visible single points at the epochs trained, percent, Recall@K
ticks at the measured K, and the paper's tick in the legend once."""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path
from typing import Any

import pytest

from benchmark.app.cli import main
from benchmark.app.leaderboard import Group, group_runs, local_runs, table_rows
from benchmark.app.leaderboard_figures import PAPER_LABEL, distinct_labels, leaderboard_figures, write_figures
from benchmark.core.results import epochs_trained
from tests.benchmark.test_run_lifecycle import _args
from tests.datamodules import fixtures

KS = [1, 10, 100]
RUNS = {"base-s0": ["--seed_everything", "0"], "base-s1": ["--seed_everything", "1"],
        "lr-s0": ["--seed_everything", "0", "--model.lr", "0.001"]}  # fmt: skip  (two groups: they differ only in lr)


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Group], list[dict[str, Any]]]:
    cub = fixtures.make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent
    root = tmp_path_factory.mktemp("board")
    for name, extra in RUNS.items():  # one epoch each: one validation after training per run
        args = ["fit", *_args(cub, *extra), "--data.batches_per_epoch", "2", "--trainer.max_epochs", "1",
                "--evaluation.recall_ks", str(KS), "--logger", "none", "--run_dir", str(root / name)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(args) == 0
    groups = group_runs(local_runs(root))
    return root, groups, table_rows(groups, ["R@1"], "final", "R@1", [])


def _records(root: Path, stage: str, *runs: str) -> list[list[dict[str, Any]]]:
    return [json.loads((root / run / f"metrics_{stage}.json").read_text())["evaluations"] for run in runs]


def _legend(ax: Any) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def _visible(line: Any) -> bool:
    """A line that draws something: two points or more, or a marker."""
    return len(line.get_xdata()) > 1 or line.get_marker() not in (None, "", " ", "None", "none")


def test_groups_that_differ_only_in_an_option_have_distinct_legend_names(board: tuple) -> None:
    _, groups, rows = board
    assert len(groups) == 2
    figures = leaderboard_figures(groups, rows, "R@1", "final")
    assert sorted(figures) == ["ranking_cub", "recall_at_k_cub", "val_curve_cub"]
    for stem in ("recall_at_k_cub", "val_curve_cub"):
        names = _legend(figures[stem].axes[0])
        assert len(names) == 2 and len(set(names)) == 2, (stem, names)
        for g in groups:  # each group's own label (what sets it apart included), on one entry
            assert sum(name.startswith(g.label) for name in names) == 1
    bars = [t.get_text() for t in figures["ranking_cub"].axes[0].get_xticklabels()]
    assert len(bars) == 2 and len(set(bars)) == 2 and set(bars) <= set(_legend(figures["recall_at_k_cub"].axes[0]))


def test_distinct_labels_names_what_differs_then_numbers() -> None:
    labels = ["ms (r50)", "ms (r50)", "pa (r50)", "x", "x"]
    settings = [{"embedding_dim": 64, "lr": 1}, {"embedding_dim": 128, "lr": 1}, {}, {"a": 1}, {"a": 1}]
    assert distinct_labels(labels, settings) == [
        "ms (r50) [embedding_dim=64]", "ms (r50) [embedding_dim=128]", "pa (r50)", "x #1", "x #2"]


def test_one_epoch_runs_are_visible_points_at_the_epochs_trained_in_percent(board: tuple) -> None:
    root, groups, rows = board
    ax = leaderboard_figures(groups, rows, "R@1", "final")["val_curve_cub"].axes[0]
    assert ax.get_xlabel() == "epochs trained"
    lines = {line.get_label().rsplit(", n=", 1)[0]: line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert len(lines) == 2 and all(_visible(line) for line in lines.values())
    base = next(g for g in groups if len(g.runs) == 2)
    line = next(line for name, line in lines.items() if name.startswith(base.label))
    trained = [[e for e in evaluations if e["global_step"] > 0] for evaluations in _records(root, "val", "base-s0", "base-s1")]
    assert list(line.get_xdata()) == sorted({epochs_trained(run[0]) for run in trained}) == [1.0]  # after one epoch
    values = [100 * run[0]["metrics"]["R@1"] for run in trained]
    assert line.get_ydata()[0] == pytest.approx(statistics.fmean(values))
    (bar,) = ax.containers  # two seeds at one epoch: their min-max as a bar (a band there has no width)
    segment = bar.lines[2][0].get_segments()[0]
    assert segment[:, 1] == pytest.approx([min(values), max(values)])


def test_recall_at_k_is_ticked_at_the_measured_ks_as_integers(board: tuple) -> None:
    root, groups, rows = board
    ax = leaderboard_figures(groups, rows, "R@1", "final")["recall_at_k_cub"].axes[0]
    assert list(ax.get_xticks()) == KS and [t.get_text() for t in ax.get_xticklabels()] == [str(k) for k in KS]
    assert len(ax.xaxis.get_minorticklocs()) == 0
    lr = next(g for g in groups if len(g.runs) == 1)
    line = next(line for line in ax.get_lines() if line.get_label().startswith(lr.label))
    (final,) = _records(root, "test", "lr-s0")[0]
    assert list(line.get_ydata()) == pytest.approx([100 * final["metrics"][f"R@{k}"] for k in KS])


def test_the_papers_tick_has_one_legend_entry(board: tuple, tmp_path: Path) -> None:
    _, groups, rows = board
    rows = [dict(r, **{"paper_R@1": 60.0 + i}) for i, r in enumerate(rows)]
    ax = leaderboard_figures(groups, rows, "R@1", "final")["ranking_cub"].axes[0]
    assert _legend(ax) == [PAPER_LABEL]
    ticks = [line for line in ax.get_lines() if list(line.get_ydata()) in ([60.0, 60.0], [61.0, 61.0])]
    assert len(ticks) == 2
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx([r["R@1_mean"] for r in rows])  # percent, as the table
    paths = write_figures(groups, rows, "R@1", "final", tmp_path / "figs")
    assert [p.name for p in paths] == ["ranking_cub.png", "recall_at_k_cub.png", "val_curve_cub.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert not list((tmp_path / "figs").glob(".*.tmp"))  # written atomically: no temporary left
