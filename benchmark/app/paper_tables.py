"""``python -m benchmark suite paper-table FILE``: a paper's tables, row by row, next to the suite's runs.

A suite that reproduces a paper names it (``paper: intra_batch``) and maps its cells to the paper's
rows (``reproduces:``: a cell selector, a table and a row of ``benchmark/core/reference/<paper>.csv``).
This view prints every number of those tables **in the paper's order**, each with

* the paper's value and the statistic it reports (``final``, ``test-best``, ``unspecified``);
* our mean ± sample std over the completed cells that reproduce it (n), as the *final* number;
* where the paper reports its best test epoch, our test-best beside it, labelled optimistic;
* the cells behind it and how many have completed, and **NOT COVERED** where no cell of the suite
  reproduces the paper's cell (its row, dataset and backbone): a table the suite claims must have
  no such line (``tests/benchmark/test_paper_tables.py`` checks the shipped suites).

The suite object is passed in (this module does not import the suite runner): it reads only the
cells' settings, their run folders and the records there, through :mod:`benchmark.core.results`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark.core.papers import PaperNumber, paper_numbers
from benchmark.core.results import (
    OPTIMISTIC,
    RecordError,
    final_evaluation,
    flat_metrics,
    read_record,
    run_state,
    selection_key,
    test_best,
    test_selected_evaluations,
)


@dataclass
class Line:
    """One number of the paper and what the suite has for it.

    ``final`` and ``test_best`` hold one value per completed cell, so their mean and sample std
    are over seeds (and over any other cells the suite maps to the same number). A completed cell
    without the metric (a refined metric the run did not report) adds to ``completed`` only.
    """

    number: PaperNumber
    cells: list[str] = field(default_factory=list)  # ids of the cells that reproduce it
    completed: int = 0  # of those cells, the ones whose run is a result (completed, with its final test)
    final: list[float] = field(default_factory=list)  # per completed cell, percent
    test_best: list[float] = field(default_factory=list)  # per completed cell, percent; selected on test

    @property
    def covered(self) -> bool:
        """Whether any cell of the suite reproduces this number (whatever its state)."""
        return bool(self.cells)


def _stats(values: Sequence[float]) -> str:
    """``mean ± sample std (n=..)`` of percent values, no std for one value, ``""`` for none."""
    if not values:
        return ""
    mean = statistics.fmean(values)
    std = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{mean:.2f}{std} (n={len(values)})"


def cell_setting(cell: Any, recipe: Callable[[Any], Path | None]) -> dict[str, Any]:
    """A cell's backbone and embedding size: its own options, else its recipe's (``None`` if neither says).

    Read from the suite file and the recipe, not from the cell's run: a cell that has not run yet
    must still be matched to the paper's numbers, so that an uncovered one shows before anything runs.

    Args:
        cell: a suite cell (:class:`benchmark.app.suites.spec.Cell`: ``backbone``, ``options``).
        recipe: the recipe a cell's fit applies, or None
            (:func:`benchmark.app.suites.reading.cell_recipe`).

    Returns:
        ``{"backbone": str | None, "dim": int | None}``.
    """
    options = dict(cell.options)
    model: Mapping[str, Any] = {}
    path = recipe(cell)
    if path is not None and path.is_file():
        config = yaml.safe_load(path.read_text()) or {}
        section = config.get("model") or {}
        # A recipe writes the model's options under init_args (class_path + init_args) or directly.
        model = section.get("init_args", section) or {}
    backbone = cell.backbone or options.get("model.backbone.name") or (model.get("backbone") or {}).get("name")
    dim = options.get("model.embedding_dim", model.get("embedding_dim"))
    return {"backbone": backbone, "dim": int(dim) if dim is not None else None}


def _metric_key(number: PaperNumber, meta: Mapping[str, Any]) -> str:
    """``refined/<metric>`` when the paper's number is the run's refined output (the names the run
    recorded, ``reference_names_refined``), else the metric."""
    return f"refined/{number.metric}" if number.method in (meta.get("reference_names_refined") or []) else number.metric


def _cell_values(run: Path, number: PaperNumber) -> tuple[float | None, float | None] | None:
    """(final, test-best) of ``number``'s metric in a completed run, or None if it is not a result.

    Both values are in percent; either is None when the run did not report the metric (test-best:
    when the run has no evaluation selected on the test split, e.g. under the holdout protocol).
    A run whose records cannot be read is not a result here: the table still stands.
    """
    if not run_state(run).completed:
        return None
    try:
        test = read_record(run / "metrics_test.json")
        val = read_record(run / "metrics_val.json") if (run / "metrics_val.json").is_file() else None
    except RecordError:
        return None
    final = final_evaluation(test)
    if final is None:
        return None
    key = _metric_key(number, test)
    value = flat_metrics(final).get(key)
    # The paper's "best test epoch": the evaluation best by the run's selection metric, this metric there.
    best = test_best([flat_metrics(e) for e in test_selected_evaluations(test, val)], selection_key(test))
    selected = None if best is None else best.get(key)
    return (None if value is None else 100 * value), (None if selected is None else 100 * selected)


def lines(suite: Any, recipe: Callable[[Any], Path | None], tables: Iterable[str] | None = None) -> list[Line]:
    """Every number of the suite's paper in the tables its cells reproduce (or ``tables``), in the
    paper's order.

    A cell reproduces a number when its ``reproduces:`` entries name the number's table and row,
    its dataset is the number's and its backbone and embedding size do not contradict it; one
    ``(table, row)`` of the paper covers several numbers (datasets, backbones, metrics).

    Args:
        suite: a loaded suite (:class:`benchmark.app.suites.spec.Suite`: ``paper``, ``cells``,
            ``run_dir(cell)``).
        recipe: the recipe of a cell, for the settings its options leave to it (:func:`cell_setting`).
        tables: the paper's tables to show (``--table``); by default those the suite's cells claim.

    Returns:
        One :class:`Line` per number, uncovered numbers included; empty when the suite names no paper.
    """
    if suite.paper is None:
        return []
    claimed = {t for cell in suite.cells for t, _ in cell.reproduces}
    wanted = set(tables) if tables is not None else claimed
    settings = {cell.id: cell_setting(cell, recipe) for cell in suite.cells}
    out = []
    for number in paper_numbers(papers=[suite.paper]):
        if number.table not in wanted:
            continue
        line = Line(number)
        for cell in suite.cells:
            setting = settings[cell.id]
            # A setting the cell's options and recipe leave open (Context-Refine takes its stage-1
            # checkpoint's backbone and size) is not held against it; a contradicting one is.
            if ((number.table, number.row) not in cell.reproduces or cell.dataset != number.dataset
                    or (setting["backbone"] is not None and setting["backbone"] != number.backbone)
                    or (setting["dim"] is not None and setting["dim"] != number.dim)):  # fmt: skip
                continue
            line.cells.append(cell.id)
            values = _cell_values(suite.run_dir(cell), number)
            if values is None:
                continue
            line.completed += 1
            if values[0] is not None:
                line.final.append(values[0])
            if values[1] is not None:
                line.test_best.append(values[1])
        out.append(line)
    return out


COLUMNS = ("table", "row", "dataset", "backbone", "dim", "metric", "paper", "statistic", "ours: final",
           f"ours: test-best ({OPTIMISTIC})", "cells")  # fmt: skip


def cells_of(line: Line) -> list[str]:
    """One line's cells in :data:`COLUMNS` order.

    Our test-best is filled only where the paper's statistic is ``test-best``: it is the matching
    (optimistic) number to set beside that paper's; the final number is always shown.
    """
    n = line.number
    status = "NOT COVERED" if not line.covered else f"{line.completed} of {len(line.cells)} completed"
    test_best = _stats(line.test_best) if n.statistic == "test-best" else ""
    return [n.table, n.row, n.dataset, n.backbone, str(n.dim), n.metric, f"{n.value:.1f}", n.statistic,
            _stats(line.final), test_best, status]  # fmt: skip


def render(suite: Any, found: Sequence[Line], console: Any) -> None:
    """One rich table per paper table, rows in the paper's order.

    The title counts the numbers not covered by any cell; those rows are red.

    Args:
        suite: the suite (its ``paper`` and ``name`` title the tables).
        found: the lines of :func:`lines`.
        console: a rich console (:func:`benchmark.core.io.console`).
    """
    from rich.table import Table

    for table_name in dict.fromkeys(line.number.table for line in found):
        subset = [line for line in found if line.number.table == table_name]
        uncovered = sum(not line.covered for line in subset)
        title = (f"{suite.paper} {table_name} — suite {suite.name}: {len(subset)} numbers"
                 + (f", {uncovered} NOT COVERED by any cell" if uncovered else ", every one covered"))  # fmt: skip
        table = Table(title=title)
        # Our test-best only where the paper reports its best test epoch: nothing to compare it with otherwise.
        keep = [i for i, col in enumerate(COLUMNS)
                if not col.startswith("ours: test-best") or any(x.number.statistic == "test-best" for x in subset)]  # fmt: skip
        for i in keep:
            table.add_column(COLUMNS[i], overflow="fold")
        for line in subset:
            cells = cells_of(line)
            table.add_row(*(cells[i] for i in keep), style="red" if not line.covered else None)
        console.print(table)
