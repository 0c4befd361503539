"""The leaderboard from real run directories of tiny fits (2 methods x 2 seeds), checked against the
runs' own result files: grouping, mean and sample std, selection rules, paper rows, formats, and the
W&B source on recorded run objects giving the same table."""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest

from benchmark.app.cli import main as cli_main
from benchmark.app.leaderboard import group_runs, local_runs, main, paper_numbers, wandb_runs
from benchmark.core.results import OPTIMISTIC
from tests.benchmark.test_run_lifecycle import _args
from tests.benchmark.wandb_capture import RecordedApi, RecordedRun, capture_wandb
from tests.datamodules import fixtures

METHODS = ("ms", "proxy_anchor")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent


def _fit(cub: Path, run_dir: Path, method: str, seed: int, *extra: str, logger: str = "none") -> None:
    code = cli_main(["fit", *_args(cub, method=method), "--data.batches_per_epoch", "2", "--trainer.max_epochs", "2",
                     "--seed_everything", str(seed), "--logger", logger, "--run_dir", str(run_dir), *extra])  # fmt: skip
    assert code == 0


@pytest.fixture(scope="module")
def project(cub: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RecordedRun]]:
    """Four completed runs (2 methods x 2 seeds) logged to W&B (offline) and to their folders."""
    root = tmp_path_factory.mktemp("suite")
    with pytest.MonkeyPatch.context() as mp, capture_wandb(mp) as recorded:
        mp.setenv("WANDB_DIR", str(root / "wandb-dir"))
        for method in METHODS:
            for seed in SEEDS:
                _fit(cub, root / "grid" / f"{method}-s{seed}", method, seed, logger="wandb")
    shutil.rmtree(root / "wandb-dir", ignore_errors=True)
    for run in (root / "grid").iterdir():
        shutil.rmtree(run / "wandb", ignore_errors=True)  # W&B's own files are not results
    return root, [r for r in recorded if r.job_type == "fit"]


@pytest.fixture(scope="module")
def runs(project: tuple[Path, list[RecordedRun]]) -> Path:
    return project[0]


def _test_value(run_dir: Path, metric: str = "R@1") -> float:
    return json.loads((run_dir / "metrics_test.json").read_text())["evaluations"][-1]["metrics"][metric]


def _csv(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, str]]:
    capsys.readouterr()  # what came before (a fit's table) is not the table
    assert main([*args, "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


@pytest.mark.filterwarnings("ignore")
def test_one_row_per_method_with_mean_and_sample_std_over_seeds(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _csv(capsys, "--runs", str(runs))
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    for row in rows:
        assert row["n_seeds"] == "2" and row["dataset"] == "cub" and row["backbone"] == "resnet_tiny_test"
        values = [100 * _test_value(runs / "grid" / f"{row['method']}-s{seed}") for seed in SEEDS]
        mean = sum(values) / 2
        std = (sum((v - mean) ** 2 for v in values) / (2 - 1)) ** 0.5  # sample std, by hand
        assert float(row["R@1_mean"]) == pytest.approx(mean, abs=1e-4)
        assert float(row["R@1_std"]) == pytest.approx(std, abs=1e-4)
        assert row["select"] == "final" and row["differs"] == ""


def test_the_ranking_metric_is_shown_when_metrics_leave_it_out(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--metric NMI --metrics R@1,R@2`` ranks by NMI and shows it first (it crashed with a KeyError)."""
    rows = _csv(capsys, "--runs", str(runs), "--metric", "NMI", "--metrics", "R@1,R@2")
    assert rows and all(row["NMI_mean"] and row["R@1_mean"] for row in rows)
    means = [float(row["NMI_mean"]) for row in rows]
    assert means == sorted(means, reverse=True)


@pytest.mark.filterwarnings("ignore")
def test_runs_that_differ_in_any_option_are_separate_rows_naming_it(runs: Path, cub: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Issue #25 case 3: the learning rate and a loss option are not in describe(), and such runs were
    merged into one row. The grouping key is the whole resolved configuration."""
    for seed in SEEDS:
        shutil.copytree(runs / "grid" / f"ms-s{seed}", tmp_path / f"ms-s{seed}")
        _fit(cub, tmp_path / f"ms-lr-s{seed}", "ms", seed, "--model.lr", "0.001")
    _fit(cub, tmp_path / "ms-beta-s0", "ms", 0, "--model.beta", "20")
    rows = _csv(capsys, "--runs", str(tmp_path))
    assert sorted((r["differs"], r["n_seeds"]) for r in rows) == [
        ("beta=20.0, lr=0.0001", "1"), ("beta=40.0, lr=0.0001", "2"), ("beta=40.0, lr=0.001", "2")]
    for row in rows:  # every row's mean is over its own runs only
        names = row["run_names"].split(";")
        values = [100 * _test_value(tmp_path / n) for n in names]
        assert float(row["R@1_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-4)
    groups = [g for g in group_runs(local_runs(tmp_path))]
    assert all("image_size" not in g.differs for g in groups)  # a row column is not repeated in "differs"
    # The W&B report charts these options by the keys runs log (config.model.lr), not the short names.
    import benchmark.app.wandb_report as report_module
    from benchmark.app.leaderboard import table_rows

    assert report_module._varying_options(table_rows(groups, ["R@1"], "final", "R@1", [])) == ["model.beta", "model.lr"]
    logged = json.loads((tmp_path / "ms-beta-s0" / "metrics_test.json").read_text())
    assert {"model.beta", "model.lr"} <= set(logged["config"])  # logged to W&B as config.<key>


@pytest.mark.filterwarnings("ignore")
def test_test_best_is_the_best_test_split_evaluation_and_says_so(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = {r["method"]: r for r in _csv(capsys, "--runs", str(runs), "--select", "test-best")}
    for method in METHODS:
        best = []
        for seed in SEEDS:
            val = json.loads((runs / "grid" / f"{method}-s{seed}" / "metrics_val.json").read_text())
            assert val["split"] == "test"  # the paper protocol validates on the test split
            best.append(100 * max(e["metrics"]["R@1"] for e in val["evaluations"] if e["global_step"] > 0))
        assert float(rows[method]["R@1_mean"]) == pytest.approx(statistics.fmean(best), abs=1e-4)
        assert OPTIMISTIC in rows[method]["select"]


def test_paper_rows_and_delta_match_dataset_backbone_and_dimension(tmp_path: Path, capsys) -> None:
    def fake(name: str, dim: int, r1: float) -> None:
        run = tmp_path / name
        run.mkdir()
        data = {"dataset": "cub", "method": "ms", "backbone": "resnet50", "embedding_dim": dim, "protocol": "paper",
                "image_size": 224, "seed": 0, "reference_names": ["ms", "ms_baseline"], "evaluations": [{"stage": "test", "metrics": {"R@1": r1}}]}  # fmt: skip
        (run / "metrics_test.json").write_text(json.dumps(data))
        (run / "status.json").write_text(json.dumps({"status": "completed", "exit_code": 0}))

    fake("a", 512, 0.70)
    fake("b", 128, 0.60)
    assert next(n.value for n in paper_numbers() if (n.method, n.dataset, n.metric) == ("ms_baseline", "cub", "R@1")) == 67.5
    rows = {r["embedding_dim"]: r for r in _csv(capsys, "--runs", str(tmp_path))}
    assert float(rows["512"]["paper_R@1"]) == 67.5 and float(rows["512"]["delta_R@1"]) == pytest.approx(2.5)
    assert rows["128"]["paper_R@1"] == "" and rows["128"]["delta_R@1"] == ""  # a 128-d run is not the 512-d paper setting
    assert main(["--runs", str(tmp_path), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert "[paper] ms_baseline (context_refine Table 3: MS-Loss)" in md and "+2.50" in md


def _wandb_source(monkeypatch: pytest.MonkeyPatch, recorded: list[RecordedRun]) -> RecordedApi:
    """``leaderboard --wandb`` reads the recorded runs (logged in, as far as the command can tell)."""
    import benchmark.app.leaderboard as lb

    api = RecordedApi(recorded)
    monkeypatch.setattr(lb, "wandb_runs", lambda project, filters=None: wandb_runs(project, filters, api=api))
    monkeypatch.setattr(lb, "wandb_logged_in", lambda: True)
    return api


@pytest.mark.filterwarnings("ignore")
def test_wandb_and_the_run_folders_give_the_same_rows(project: tuple[Path, list[RecordedRun]],
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """What the runs logged to W&B (captured from the real offline runs) gives the table the folders give,
    cell for cell, under both selection rules."""
    runs, recorded = project
    assert len(recorded) == 4 and all(r.config.get("comparison_key") and r.config.get("steps_trained") == 4
                                      for r in recorded)  # fmt: skip
    api = _wandb_source(monkeypatch, recorded)
    records = wandb_runs("me/dml", api=api)
    assert len(records) == 4 and all(r.source == "wandb" and r.counted for r in records)
    drop = ("run_names",)  # folder paths locally, run names in W&B
    for select in ("final", "test-best"):
        local = [{k: v for k, v in r.items() if k not in drop} for r in _csv(capsys, "--runs", str(runs), "--select", select)]
        remote = [{k: v for k, v in r.items() if k not in drop} for r in _csv(capsys, "--wandb", "me/dml", "--select", select)]
        assert remote == local and len(local) == 2
    assert [r["method"] for r in _csv(capsys, "--wandb", "me/dml", "--filter", "method=ms")] == ["ms"]
    assert api.calls[-1] == ("me/dml", {"config.method": "ms"})
    # A number is logged typed (seed 0), which W&B's filter does not match with the text "0": such a
    # value is matched on the runs read, as a local run's is (the table found no run).
    seeded = _csv(capsys, "--wandb", "me/dml", "--filter", "method=ms", "--filter", "seed=0")
    assert [r["method"] for r in seeded] == ["ms"] and seeded[0]["seeds"] == "0"
    assert api.calls[-1] == ("me/dml", {"config.method": "ms"})
    local = _csv(capsys, "--runs", str(runs), "--filter", "method=ms", "--filter", "seed=0")
    assert [{k: v for k, v in r.items() if k not in drop} for r in local] == [
        {k: v for k, v in r.items() if k not in drop} for r in seeded]


@pytest.mark.filterwarnings("ignore")
def test_html_page_and_figures_are_written(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "board.html"
    assert main(["--runs", str(runs), "--format", "html", "--out", str(page), "--figures", str(tmp_path / "fig")]) == 0
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 2 and "<table>" in text and "sortTable" in text
    names = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    assert names == ["ranking_cub.png", "recall_at_k_cub.png", "val_curve_cub.png"]
    for name in names:
        assert (tmp_path / "fig" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "board.json"
    assert main(["--runs", str(runs), "--format", "json", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == set(METHODS) and all(len(r["R@1_per_seed"]) == 2 for r in rows)


def test_bad_input_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["leaderboard", "--runs", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli_main(["leaderboard", "--runs", str(tmp_path), "--filter", "method"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore")
def test_the_wandb_report_is_built_from_a_recorded_project(project: tuple[Path, list[RecordedRun]],
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # fmt: skip
    import wandb_workspaces.reports.v2 as wr

    import benchmark.app.wandb_report as report_module

    runs, recorded = project
    for r in recorded:
        r.url = f"https://wandb.example.com/me/dml/runs/{r.name}"
    _wandb_source(monkeypatch, recorded)
    capsys.readouterr()
    assert main(["--wandb", "me/dml", "--publish", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "W&B Report 'DML benchmark leaderboard' in me/dml" in text and "H2: cub" in text
    assert "table: leaderboard-dml:latest/leaderboard.table.json" in text
    assert ("Config('dataset') == 'cub' and Metric('State') == 'finished' and Metric('JobType') == 'fit'" in text
            and "grouped by config.comparison_group" in text)  # fmt: skip
    assert "ParallelCoordinatesPlot" in text and "MediaBrowser" in text and "ms_baseline (context_refine)" in text
    # --dry-run from local folders: no W&B project is read (the leaderboard is offline), same outline.
    monkeypatch.setattr(report_module, "existing_report", None)
    capsys.readouterr()
    assert main(["--runs", str(runs), "--wandb", "me/dml", "--publish", "--dry-run"]) == 0
    offline = capsys.readouterr().out
    assert [line for line in offline.splitlines() if "runs/" not in line] == \
        [line for line in text.splitlines() if "runs/" not in line and "H3: Runs" not in line]  # fmt: skip

    saved: list[Any] = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saved.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: f"https://wandb.example.com/report/{self.id or 'new'}"),
                        raising=False)  # fmt: skip
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    from wandb.sdk.wandb_run import Run

    logged: list[Any] = []
    log_artifact = Run.log_artifact
    monkeypatch.setattr(Run, "log_artifact", lambda self, a, *x, **k: logged.append(a) or log_artifact(self, a, *x, **k))
    previous: list[Any] = []  # the project's reports, as W&B would list them
    monkeypatch.setattr(report_module, "existing_report", lambda entity, project, title: previous[0] if previous else None)
    capsys.readouterr()
    assert main(["--wandb", "me/dml", "--publish"]) == 0
    assert "published https://wandb.example.com/report/new" in capsys.readouterr().out
    report = saved[0]
    kinds = [type(b).__name__ for b in report.blocks]
    assert kinds[:3] == ["H1", "P", "TableOfContents"] and kinds.count("H2") == 1
    assert "MarkdownBlock" not in kinds[:kinds.index("PanelGrid")]  # the table is the logged W&B Table, not Markdown
    grid = next(b for b in report.blocks if type(b).__name__ == "PanelGrid")
    bar, line, parallel, media = grid.panels
    assert bar.metrics == ["test/R@1"] and bar.groupby == wr.Config("comparison_group")
    assert line.y == ["val/R@1"] and line.x == "val/epochs_trained" and line.groupby == wr.Config("comparison_group")
    assert "figures/retrieval_grid" in media.media_keys and parallel.columns
    links = [b for b in report.blocks if type(b).__name__ == "MarkdownBlock"][-1].text
    assert links.count("https://wandb.example.com/me/dml/runs/") == 4
    assert logged and logged[0].type == "leaderboard" and "leaderboard.table.json" in logged[0].manifest.entries
    # Published again: the same report (found by its title) is updated, not a second one made.
    report.id = "report-1"
    previous.append(report)
    saved.clear()
    assert main(["--wandb", "me/dml", "--publish"]) == 0
    assert saved[0] is report and saved[0].id == "report-1"
    assert "published https://wandb.example.com/report/report-1" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore")
def test_per_seed_values_sit_under_the_ranking_metric(runs: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """--per-seed wrote every seed's value under the first metric column, whichever ranked the rows."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per table row
    out = runs.parent / "board.json"
    assert main(["--runs", str(runs), "--metrics", "R@1,MAP@R", "--metric", "MAP@R", "--format", "json", "--out", str(out)]) == 0
    per_seed = {f"{v:.2f}" for r in json.loads(out.read_text())["rows"] for v in r["MAP@R_per_seed"].values()}
    capsys.readouterr()
    assert main(["--runs", str(runs), "--metrics", "R@1,MAP@R", "--metric", "MAP@R", "--per-seed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "MAP@R" in line and "method" in line)
    column = [c.strip() for c in header.split("┃")].index("MAP@R")
    seeds = [[c.strip() for c in line.split("│")] for line in lines if "seed " in line]
    assert len(seeds) == 2 * len(METHODS)
    assert all(cells[column] in per_seed and cells[column - 1] == "" for cells in seeds), seeds
