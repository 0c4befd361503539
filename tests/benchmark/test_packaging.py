"""What users install: the wheel carries every package and the recipes, and works outside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[2]


def test_every_source_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("benchmark", "methods", "datamodules")
        for p in (REPO / top).rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml's [tool.setuptools] packages: {found - listed}"
    assert "benchmark.recipes" in listed


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the source tree and install it (no dependencies) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", "wandb")
    shutil.copytree(REPO, source, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(source)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("dml_benchmark-*.whl")
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    return target


def _run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_carries_the_recipes_and_runs_outside_the_repository(installed_wheel: Path, tmp_path: Path) -> None:
    assert sorted(p.relative_to(installed_wheel / "benchmark" / "recipes") for p in
                  (installed_wheel / "benchmark" / "recipes").rglob("*.yaml")) == sorted(
        p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml"))
    where = _run_installed(installed_wheel, tmp_path, "-c", "import benchmark, methods; print(benchmark.__file__, methods.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(str(installed_wheel) in p for p in where.stdout.split()), where.stdout  # not the source tree
    shown = _run_installed(installed_wheel, tmp_path, "-m", "benchmark", "fit", "--method", "dmcac", "--print_config")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "logit_scale: 16.0" in shown.stdout and "image_size: 16" in shown.stdout  # configs/dmcac/synthetic.yaml
    assert "precision: auto" in shown.stdout


def test_the_wheel_carries_the_papers_numbers_and_the_page_template(installed_wheel: Path, tmp_path: Path) -> None:
    """The reference numbers (one file per paper) and the leaderboard's HTML template are package data: the
    paper-table view and the HTML page work from an installed wheel, outside the repository."""
    shipped = sorted(p.name for p in (REPO / "benchmark" / "core" / "reference").glob("*.csv"))
    assert shipped and sorted(p.name for p in (installed_wheel / "benchmark" / "core" / "reference").glob("*.csv")) == shipped
    assert (installed_wheel / "benchmark" / "app" / "templates" / "leaderboard.html").is_file()
    table = _run_installed(installed_wheel, tmp_path, "-m", "benchmark", "suite", "paper-table", "context_refine_table")
    assert table.returncode == 0, table.stderr[-3000:]
    assert "every one covered" in table.stdout and "NOT COVERED by" not in table.stdout
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "status.json").write_text('{"status": "completed", "exit_code": 0}')
    (run / "metrics_test.json").write_text('{"dataset": "cub", "method": "ms", "backbone": "resnet50", "embedding_dim": 512,'
                                           ' "seed": 0, "evaluations": [{"stage": "test", "metrics": {"R@1": 0.6}}]}')
    page = _run_installed(installed_wheel, tmp_path, "-m", "benchmark", "leaderboard", "--runs", "runs", "--format", "html",
                          "--out", "board.html")  # fmt: skip
    assert page.returncode == 0, page.stderr[-3000:]
    assert "sortTable" in (tmp_path / "board.html").read_text() and "60.00" in (tmp_path / "board.html").read_text()
