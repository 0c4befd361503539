"""Every user error, through the real command line (a subprocess per case, run in parallel).

Each case must exit with 2, print no traceback, name the cause and the fix, fail before any
data pass, and leave no run directory behind. "Before any data pass" is checked by the
output: the CLI announces the run directory when the trainer exists, before its first data
pass, so a case whose output lacks that line failed while the options and files were being
checked. Wall times are too noisy on a shared 2-core machine to serve as the proof; a
generous bound only catches a hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.datamodules import fixtures

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 240.0  # a hang, not a measurement


def _cases(tmp: Path) -> list[tuple[str, list[str], list[str]]]:
    """(id, arguments, fragments the message must contain)."""
    cub = fixtures.make_cub(tmp / "cub", classes=200, per_class=3).parent
    inshop = fixtures.make_inshop(tmp / "inshop")
    (tmp / "weights.txt").write_text("not weights\n")
    torch.save([1, 2, 3], tmp / "list.pth")
    (tmp / "a_file").write_text("")
    good = tmp / "good.ckpt"
    torch.save({"state_dict": {}}, good)
    (tmp / "truncated.ckpt").write_bytes(good.read_bytes()[:-100])
    base = ["fit", "--method", "ms", "--data", "cub", "--data.root", str(cub), "--recipe", "none",
            "--backbone", "resnet50", "--backbone.pretrained", "false", "--data.num_workers", "0", "--logger", "none"]

    def fit(*extra: str) -> list[str]:
        return [*base, *extra]

    return [
        ("unknown-method", ["fit", "--method", "nope"], ["Unknown method 'nope'", "dmcac"]),
        ("unknown-dataset", ["fit", "--data", "imagenet"], ["Unknown dataset 'imagenet'", "cub"]),
        ("unknown-backbone", fit("--model.backbone.name", "resnet5"), ["Unknown backbone 'resnet5'", "resnet50", "benchmark list"]),
        ("option-typo", fit("--trainer.max_epoch", "7"), ["--trainer.max_epoch", "Did you mean --trainer.max_epochs"]),
        ("model-option-typo", fit("--model.lrr", "1"), ["--model.lrr", "Did you mean --model.lr"]),
        ("weights-missing", fit("--backbone.weights", str(tmp / "absent.pth")), ["absent.pth", "does not exist"]),
        ("weights-list", fit("--backbone.weights", str(tmp / "list.pth")), ["list.pth", "not a state dict"]),
        ("weights-text", fit("--backbone.weights", str(tmp / "weights.txt")), ["weights.txt", "Cannot read"]),
        ("run-dir-is-a-file", fit("--run_dir", str(tmp / "a_file")), ["a_file", "is a file"]),
        ("run-dir-unwritable", fit("--run_dir", "/proc/dml-benchmark-run"), ["/proc/dml-benchmark-run", "--run_dir"]),
        ("checkpoint-missing", ["test", "--method", "ms", "--ckpt_path", str(tmp / "nope.ckpt")], ["nope.ckpt", "does not exist"]),
        ("checkpoint-truncated", ["test", "--method", "ms", "--ckpt_path", str(tmp / "truncated.ckpt")],
         ["truncated.ckpt", "damaged or truncated"]),
        ("lr-zero", fit("--model.lr", "0"), ["lr=0.0", "> 0"]),
        ("lr-negative", fit("--model.lr=-1e-3"), ["lr=-0.001", "> 0"]),
        ("too-many-classes", fit("--data.classes_per_batch", "150"), ["classes_per_batch=150", "100 classes"]),
        ("samples-per-class-0", fit("--data.samples_per_class", "0"), ["samples_per_class=0", ">= 1"]),
        ("image-size-0", fit("--data.image_size", "0"), ["image_size=0", ">= 1"]),
        ("dataset-missing", fit("--data.root", str(tmp / "nowhere")), ["nowhere", "CUB"]),
        ("inshop-too-deep", ["fit", "--method", "ms", "--data", "inshop", "--data.root", str(inshop / "Eval"),
                             "--logger", "none"], ["one level too deep", f"--data.root '{inshop}'"]),
    ]


def _run(case: tuple[str, list[str], list[str]], tmp: Path) -> tuple[str, int, str, float, list[str]]:
    name, args, _ = case
    cwd = tmp / "cwd" / name
    cwd.mkdir(parents=True)
    env = {**os.environ, "DML_BENCHMARK_DATA": str(tmp / "data"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DML_BENCHMARK_RUN_DIR", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmark", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    elapsed = time.monotonic() - start
    left = [str(p.relative_to(cwd)) for p in cwd.rglob("*")]
    return name, proc.returncode, proc.stdout + proc.stderr, elapsed, left


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, float, list[str], list[str]]]:
    tmp = tmp_path_factory.mktemp("user-errors")
    cases = _cases(tmp)
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda c: _run(c, tmp), cases))
    fragments = {name: frags for name, _, frags in cases}
    return {name: (code, out, elapsed, left, fragments[name]) for name, code, out, elapsed, left in done}


CASE_IDS = [
    "unknown-method", "unknown-dataset", "unknown-backbone", "option-typo", "model-option-typo", "weights-missing",
    "weights-list", "weights-text", "run-dir-is-a-file", "run-dir-unwritable", "checkpoint-missing",
    "checkpoint-truncated", "lr-zero", "lr-negative", "too-many-classes", "samples-per-class-0", "image-size-0",
    "dataset-missing", "inshop-too-deep",
]


@pytest.mark.parametrize("case", CASE_IDS)
def test_user_error_exits_2_quickly_with_the_cause_and_no_traceback(results, case: str) -> None:
    code, out, elapsed, left, fragments = results[case]
    assert code == 2, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    for fragment in fragments:
        assert fragment in out, (fragment, out[-2000:])
    assert "error:" in out and len(out.splitlines()) <= 12, out  # a paragraph, not pages of usage
    assert "[benchmark] run directory" not in out, out[-2000:]  # failed before the trainer could pass over data
    assert elapsed < BOUND_S, f"{case} took {elapsed:.1f} s"
    assert not [p for p in left if p.startswith("runs")], left  # no run directory behind
