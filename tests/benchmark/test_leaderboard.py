"""The local leaderboard: last test evaluation per run, ranked, with the papers' numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.leaderboard import local_runs, main, paper_numbers


def _run(root: Path, name: str, method: str, r1: float, dataset: str = "cub") -> None:
    run = root / name
    run.mkdir(parents=True)
    data = {
        "dataset": dataset, "method": method, "backbone": "resnet50", "embedding_dim": 512, "protocol": "paper", "seed": 0,
        "evaluations": [
            {"stage": "test", "metrics": {"R@1": 0.1, "MAP@R": 0.01}},
            {"stage": "test", "metrics": {"R@1": r1, "MAP@R": r1 / 2}},
        ],
    }
    (run / "metrics_test.json").write_text(json.dumps(data))


def test_rows_rank_and_show_paper_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    _run(tmp_path, "a", "ms", 0.55)
    _run(tmp_path, "b", "margin", 0.61)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics_test.json").write_text("{not json")
    rows = local_runs(tmp_path)
    assert [r["run"] for r in rows] == ["a", "b"]
    assert rows[0]["metrics"]["R@1"] == 0.55  # the last evaluation, not the first
    assert paper_numbers()[("ms_baseline", "resnet50", "cub", "R@1")] == 67.5
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("margin") < out.index(" ms ")  # ranked by R@1
    assert "61.00" in out and "55.00" in out and "67.5" in out and "63.1" in out
