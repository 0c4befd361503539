"""Issue #26: suites that reproduce a paper's tables say which rows their cells reproduce, cover every row of
every table they claim, and `suite paper-table` puts the paper's numbers, in its order and with its statistic,
next to ours (final; test-best beside it, labelled, where the paper reports its best test epoch)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from benchmark.app import paper_tables
from benchmark.app.cli import main
from benchmark.app.suites.reading import cell_recipe
from benchmark.app.suites.spec import load_suite, shipped_suites
from benchmark.core import papers
from benchmark.core.defaults import recipe_dir
from benchmark.core.papers import STATISTICS, known_papers, paper_numbers
from tests.benchmark.test_suites import tiny_suite
from tests.datamodules import fixtures

pytestmark = pytest.mark.filterwarnings("ignore")

#: Shipped suites whose paper has no reported numbers to reproduce (the Cross-Image-Attention paper's
#: supplement is the only public text; it reports no table of this method's numbers).
NO_REFERENCE = {"cross_image_attention_table"}


def test_every_reference_file_is_well_formed() -> None:
    for paper in known_papers():
        numbers = paper_numbers(papers=[paper])
        assert numbers, paper
        assert {n.statistic for n in numbers} <= set(STATISTICS)
        cells = [(n.table, n.row, n.dataset, n.backbone, n.dim, n.metric) for n in numbers]
        assert len(cells) == len(set(cells)), f"{paper}: a number is listed twice"


@pytest.mark.parametrize("name", sorted(n for n in shipped_suites() if n.endswith(("_table", "_table1"))))
def test_each_table_suite_covers_every_row_of_the_tables_it_claims(name: str) -> None:
    suite = load_suite(name)
    if name in NO_REFERENCE:
        assert suite.paper is None
        return
    assert suite.paper in known_papers(), f"{name} names no paper (paper: NAME, reproduces: ...)"
    found = paper_tables.lines(suite, cell_recipe)
    claimed = {t for cell in suite.cells for t, _ in cell.reproduces}
    assert claimed, f"{name} maps no cell to a row of its paper"
    # Every table of the paper the suite claims is there row by row, and no row is left without a cell.
    assert {line.number.table for line in found} == claimed
    missing = [f"{n.table} / {n.row} / {n.dataset} / {n.backbone} / {n.metric}" for n in (x.number for x in found
               if not x.covered)]  # fmt: skip
    assert not missing, f"{name} leaves paper cells uncovered: {missing}"
    every = paper_numbers(papers=[suite.paper])
    assert len(found) == sum(n.table in claimed for n in every)


def test_paper_table_puts_our_numbers_beside_the_papers_with_its_statistic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A toy paper (its reference file in a folder of its own) with a test-best table: two tiny completed
    seeds reproduce one row; a second row has no cell and is marked; the leaderboard shows the statistic."""
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "toy.csv").write_text(
        "table,row,method,backbone,dim,dataset,metric,value,statistic\n"
        "Table 1,Ours,ms,resnet_tiny_test,8,cub,R@1,50.0,test-best\n"
        "Table 1,Ours,ms,resnet_tiny_test,8,cub,NMI,40.0,test-best\n"
        "Table 1,Larger,ms,resnet_tiny_test,8,cars,R@1,60.0,test-best\n"
    )
    monkeypatch.setattr(papers, "REFERENCE_DIR", reference)
    cub = fixtures.make_cub(tmp_path / "cub", classes=200, per_class=3).parent
    out = tmp_path / "out"
    path = tiny_suite(tmp_path / "toy_table.yaml", cub, out, extra=(
        "paper: toy\nreproduces:\n  - {cells: method=ms, table: Table 1, row: Ours}\n"))  # fmt: skip
    assert main(["suite", "run", str(path)]) == 0
    capsys.readouterr()
    assert main(["suite", "paper-table", str(path)]) == 0
    text = capsys.readouterr().out
    runs = [out / f"ms-cub-resnet_tiny_test-seed{s}" for s in (0, 1)]
    finals = [100 * next(e for e in json.loads((r / "metrics_test.json").read_text())["evaluations"]
                         if e["role"] == "final")["metrics"]["NMI"] for r in runs]  # fmt: skip
    bests = []  # the paper's best test epoch: the evaluation with the best R@1 (the earliest of ties), its NMI
    for r in runs:
        entries = [e for e in json.loads((r / "metrics_val.json").read_text())["evaluations"] if e["global_step"] > 0]
        top = max(e["metrics"]["R@1"] for e in entries)
        bests.append(100 * next(e for e in entries if e["metrics"]["R@1"] == top)["metrics"]["NMI"])
    nmi_line = next(line for line in text.splitlines() if "│ NMI " in line)
    assert f"{statistics.fmean(finals):.2f} ± {statistics.stdev(finals):.2f} (n=2)" in nmi_line
    assert f"{statistics.fmean(bests):.2f} ± {statistics.stdev(bests):.2f} (n=2)" in nmi_line
    assert "40.0" in nmi_line and "test-best" in nmi_line and "2 of 2 completed" in nmi_line
    larger = next(line for line in text.splitlines() if "Larger" in line)
    assert "NOT COVERED" in larger and "1 NOT COVERED" in text
    # The paper's rows come in its order, the claimed table whole.
    order = [line.split("│")[2].strip() for line in text.splitlines() if line.startswith("│ Table 1")]
    assert order == ["Ours", "Ours", "Larger"]
    # The leaderboard: the paper's statistic, and our test-best (labelled) beside the honest final number.
    capsys.readouterr()
    assert main(["leaderboard", "--runs", str(out), "--metric", "NMI", "--format", "csv"]) == 0
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["paper_NMI"] == "40.0000" and row["paper_statistic"] == "test-best"
    assert float(row["NMI_test_best_mean"]) == pytest.approx(statistics.fmean(bests), abs=1e-4)
    assert float(row["NMI_mean"]) == pytest.approx(statistics.fmean(finals), abs=1e-4)
    # A reproduces: entry naming a row the paper does not have is refused before anything runs.
    bad = tiny_suite(tmp_path / "bad.yaml", cub, tmp_path / "bad-out", extra=(
        "paper: toy\nreproduces:\n  - {cells: method=ms, table: Table 1, row: Oursss}\n"))  # fmt: skip
    capsys.readouterr()
    assert main(["suite", "run", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "toy has no row 'Oursss' in 'Table 1'" in err and "Rows of Table 1: Larger; Ours" in err


def test_a_cell_with_recipe_auto_reads_the_shipped_recipe(tmp_path: Path) -> None:
    """``recipe: auto`` is what ``fit`` does by default: the paper table reads the same recipe (it read none)."""
    suite_file = tmp_path / "s.yaml"
    suite_file.write_text("name: s\nargs:\n  recipe: auto\ngrid:\n  methods: [ms]\n  datasets: [cub]\n")
    cell = load_suite(suite_file, tmp_path / "out").cells[0]
    assert cell_recipe(cell) == recipe_dir() / "ms" / "cub.yaml" and cell_recipe(cell).is_file()
