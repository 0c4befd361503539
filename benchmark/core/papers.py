"""The numbers the papers report (``benchmark/core/reference/<paper>.csv``), as the leaderboard, the suites'
paper-table view and the tests read them.

One file per paper, one row per reported cell: the paper's table and row label (rows in the paper's
order), our reference name for the method (what ``RetrievalMethod.reference_names`` returns for a run
of that setting), backbone, embedding size, dataset, metric, value in percent, and the *statistic*
the paper reports:

* ``final``: the model at the end of training;
* ``test-best``: the best evaluation on the test split over training (the public code of the paper
  keeps the best test epoch): optimistic, and compared with our test-best, labelled so, beside the
  honest final number;
* ``unspecified``: the paper does not say.

A contract module: the standard library only.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REFERENCE_DIR = Path(__file__).with_name("reference")
STATISTICS = ("final", "test-best", "unspecified")
COLUMNS = ("table", "row", "method", "backbone", "dim", "dataset", "metric", "value", "statistic")


@dataclass(frozen=True)
class PaperNumber:
    """One number a paper reports: where it stands in the paper and what it measures."""

    paper: str
    method: str
    backbone: str
    dim: int
    dataset: str
    metric: str
    value: float  # percent
    table: str = ""
    row: str = ""
    statistic: str = "unspecified"

    @property
    def cell(self) -> tuple[str, str, str, str]:
        """The setting a suite cell reproduces: (table, row, dataset, backbone)."""
        return self.table, self.row, self.dataset, self.backbone


def read_paper(path: Path) -> list[PaperNumber]:
    """The rows of one ``<paper>.csv`` (the paper's name is the file's stem); a malformed row raises
    ValueError naming the file and line."""
    lines = path.read_text().splitlines()
    data = [(i + 1, line) for i, line in enumerate(lines) if line.strip() and not line.startswith("#")]
    reader = csv.DictReader([line for _, line in data])
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise ValueError(f"{path}: the header must be {','.join(COLUMNS)}; found {','.join(reader.fieldnames or [])}")
    numbers = []
    for (number, _), row in zip(data[1:], reader):
        try:
            if row["statistic"] not in STATISTICS:
                raise ValueError(f"statistic {row['statistic']!r} is not one of {', '.join(STATISTICS)}")
            numbers.append(PaperNumber(path.stem, row["method"], row["backbone"], int(row["dim"]), row["dataset"],
                                       row["metric"], float(row["value"]), row["table"], row["row"],
                                       row["statistic"]))  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}, line {number}: {err}") from None
    return numbers


def paper_numbers(folder: Path | None = None, papers: Iterable[str] | None = None) -> list[PaperNumber]:
    """Every paper's numbers (or those of ``papers``), each paper's rows in its order; ``folder``
    defaults to :data:`REFERENCE_DIR` (read when called)."""
    wanted = set(papers) if papers is not None else None
    return [n for path in sorted(Path(folder or REFERENCE_DIR).glob("*.csv")) if wanted is None or path.stem in wanted
            for n in read_paper(path)]  # fmt: skip


def known_papers(folder: Path | None = None) -> list[str]:
    """The papers with reference numbers (the files' stems)."""
    return sorted(p.stem for p in Path(folder or REFERENCE_DIR).glob("*.csv"))
