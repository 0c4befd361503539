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

from benchmark.cli import main as cli_main
from benchmark.leaderboard import OPTIMISTIC, group_runs, local_runs, main, paper_numbers, wandb_runs
from tests.benchmark.test_run_lifecycle import _args
from tests.datamodules import fixtures

METHODS = ("ms", "proxy_anchor")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cub = fixtures.make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent
    root = tmp_path_factory.mktemp("suite")
    for method in METHODS:
        for seed in SEEDS:
            code = cli_main(["fit", *_args(cub, method=method), "--data.batches_per_epoch", "2",
                             "--trainer.max_epochs", "2", "--seed_everything", str(seed), "--logger", "none",
                             "--run_dir", str(root / "grid" / f"{method}-s{seed}")])  # fmt: skip
            assert code == 0
    return root


def _test_value(run_dir: Path, metric: str = "R@1") -> float:
    return json.loads((run_dir / "metrics_test.json").read_text())["evaluations"][-1]["metrics"][metric]


def _csv(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, str]]:
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


@pytest.mark.filterwarnings("ignore")
def test_runs_that_differ_in_a_setting_are_separate_rows_naming_it(runs: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shutil.copytree(runs / "grid", tmp_path / "grid")
    other = tmp_path / "grid" / "ms-s1" / "metrics_test.json"
    data = json.loads(other.read_text())
    data["image_size"] = 32  # as if trained at another resolution
    other.write_text(json.dumps(data))
    rows = [r for r in _csv(capsys, "--runs", str(tmp_path)) if r["method"] == "ms"]
    assert sorted((r["image_size"], r["n_seeds"]) for r in rows) == [("16", "1"), ("32", "1")]
    groups = [g for g in group_runs(local_runs(tmp_path)) if g.settings["method"] == "ms"]
    assert all(g.differs == {} for g in groups)  # image_size is a row column, not repeated in "differs"
    data["image_size"], data["precision"] = 16, "bf16-mixed"
    other.write_text(json.dumps(data))
    rows = [r for r in _csv(capsys, "--runs", str(tmp_path)) if r["method"] == "ms"]
    assert sorted(r["differs"] for r in rows) == ["precision=32-true", "precision=bf16-mixed"]


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
                "image_size": 224, "seed": 0, "evaluations": [{"stage": "test", "metrics": {"R@1": r1}}]}  # fmt: skip
        (run / "metrics_test.json").write_text(json.dumps(data))

    fake("a", 512, 0.70)
    fake("b", 128, 0.60)
    assert next(n.value for n in paper_numbers() if (n.method, n.dataset, n.metric) == ("ms_baseline", "cub", "R@1")) == 67.5
    rows = {r["embedding_dim"]: r for r in _csv(capsys, "--runs", str(tmp_path))}
    assert float(rows["512"]["paper_R@1"]) == 67.5 and float(rows["512"]["delta_R@1"]) == pytest.approx(2.5)
    assert rows["128"]["paper_R@1"] == "" and rows["128"]["delta_R@1"] == ""  # a 128-d run is not the 512-d paper setting
    assert main(["--runs", str(tmp_path), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert "ms_baseline (paper: context_refine)" in md and "+2.50" in md


class RecordedRun:
    """A W&B public-API run as recorded from a project: name, config, summary, history."""

    def __init__(self, name: str, config: dict[str, Any], summary: dict[str, Any], history: list[dict[str, Any]]):
        self.name, self.config, self.summary, self._history = name, config, summary, history
        self.url: str | None = None

    def history(self, pandas: bool = True) -> list[dict[str, Any]]:
        return self._history


class RecordedApi:
    def __init__(self, runs: list[RecordedRun]) -> None:
        self._runs, self.calls = runs, []

    def runs(self, path: str, filters: dict[str, Any] | None = None) -> list[RecordedRun]:
        self.calls.append((path, filters))
        return [r for r in self._runs if all(str(r.config.get(k.split(".", 1)[1])) == v for k, v in (filters or {}).items())]


def _as_wandb(run_dir: Path) -> RecordedRun:
    """What the W&B logger records for a run: flat config (+ hparams/, version.*), test/* summary, val/* history."""
    test = json.loads((run_dir / "metrics_test.json").read_text())
    val = json.loads((run_dir / "metrics_val.json").read_text())
    config = {k: v for k, v in test.items() if k not in ("evaluations", "metrics", "checkpoint", "stage", "split",
                                                         "recall_ks", "nmi", "map_at_k", "versions")}  # fmt: skip
    config.update({"hparams/lr": 1e-4, "hparams/backbone.name": "resnet_tiny_test", "version.torch": "2.x", "_wandb": {}})
    summary = {f"test/{k}": v for k, v in test["evaluations"][-1]["metrics"].items()}
    summary["best/val/R@1"] = 0.5
    history = [{"epoch": e["epoch"], "trainer/global_step": e["global_step"], **{f"val/{k}": v for k, v in e["metrics"].items()}}
               for e in val["evaluations"]]  # fmt: skip
    return RecordedRun(run_dir.name, config, summary, history)


@pytest.mark.filterwarnings("ignore")
def test_a_recorded_wandb_project_gives_the_same_table(runs: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    api = RecordedApi([_as_wandb(p) for p in sorted((runs / "grid").iterdir())])
    records = wandb_runs("me/dml", api=api)
    assert len(records) == 4 and all(r.source == "wandb" for r in records)
    import benchmark.leaderboard as lb

    monkeypatch.setattr(lb, "wandb_runs", lambda project, filters=None: wandb_runs(project, filters, api=api))
    keep = ("method", "n_seeds", "R@1_mean", "R@1_std", "MAP@R_mean", "NMI_mean")
    local = sorted(tuple(r[k] for k in keep) for r in _csv(capsys, "--runs", str(runs)))
    remote = sorted(tuple(r[k] for k in keep) for r in _csv(capsys, "--wandb", "me/dml"))
    assert remote == local
    best_local = _csv(capsys, "--runs", str(runs), "--select", "test-best")
    best_remote = _csv(capsys, "--wandb", "me/dml", "--select", "test-best")
    assert sorted(r["R@1_mean"] for r in best_remote) == sorted(r["R@1_mean"] for r in best_local)
    assert [r["method"] for r in _csv(capsys, "--wandb", "me/dml", "--filter", "method=ms")] == ["ms"]
    assert api.calls[-1] == ("me/dml", {"config.method": "ms"})


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
def test_the_wandb_report_is_built_from_a_recorded_project(runs: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # fmt: skip
    import wandb_workspaces.reports.v2 as wr

    import benchmark.leaderboard as lb
    recorded = [_as_wandb(p) for p in sorted((runs / "grid").iterdir())]
    for r in recorded:
        r.url = f"https://wandb.example.com/me/dml/runs/{r.name}"
    api = RecordedApi(recorded)
    monkeypatch.setattr(lb, "wandb_runs", lambda project, filters=None: wandb_runs(project, filters, api=api))
    assert main(["--wandb", "me/dml", "--publish", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "W&B Report 'DML benchmark leaderboard' in me/dml" in text and "H2: cub" in text
    assert "BarPlot('test/R@1: mean ± std over seeds')" in text and "Config('dataset') == 'cub'" in text

    saved: list[Any] = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saved.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.example.com/report"), raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    from wandb.sdk.wandb_run import Run

    logged: list[Any] = []
    log_artifact = Run.log_artifact
    monkeypatch.setattr(Run, "log_artifact", lambda self, a, *x, **k: logged.append(a) or log_artifact(self, a, *x, **k))
    assert main(["--wandb", "me/dml", "--publish"]) == 0
    assert "published https://wandb.example.com/report" in capsys.readouterr().out
    report = saved[0]
    kinds = [type(b).__name__ for b in report.blocks]
    assert kinds[:3] == ["H1", "P", "TableOfContents"] and kinds.count("H2") == 1
    table = next(b for b in report.blocks if type(b).__name__ == "MarkdownBlock")
    assert "| ms |" in table.text and "| proxy_anchor |" in table.text and " ± " in table.text
    grid = next(b for b in report.blocks if type(b).__name__ == "PanelGrid")
    bar, line = grid.panels
    assert bar.metrics == ["test/R@1"] and bar.groupby_rangefunc == "stddev" and line.y == ["val/R@1"]
    links = [b for b in report.blocks if type(b).__name__ == "MarkdownBlock"][-1].text
    assert links.count("https://wandb.example.com/me/dml/runs/") == 4
    assert logged and logged[0].type == "leaderboard" and "leaderboard.table.json" in logged[0].manifest.entries
