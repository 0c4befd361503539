"""Every user error, through the command line: all cases through ``main`` in process, a few
through a real ``python -m benchmark`` subprocess.

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

# Imported at collection, not inside a test's capfd: at import, Lightning binds a log handler
# to the sys.stderr of that moment, and wandb wraps it (console capture); a capfd stream is
# closed after its test.
import lightning  # noqa: F401
import pytest
import torch
import wandb  # noqa: F401

from benchmark.app.cli import main
from benchmark.core.errors import UserError
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
        ("cia-blocks-negative", [*base[:2], "cross_image_attention", *base[3:], "--model.num_blocks", "-1"],
         ["--model.num_blocks", ">= 0"]),
        ("evaluation-backend", fit("--evaluation.backend", "gpu"), ["--evaluation.backend", "'cuda'", "'gpu'"]),
        ("augment-crop", fit("--data.augment.crop", "center"), ["augment.crop", "'random_resized'", "center"]),
        ("checkpoint-top-k", fit("--checkpoint.save_top_k", "-3"), ["--checkpoint.save_top_k=-3", ">= -1"]),
        ("inshop-too-deep", ["fit", "--method", "ms", "--data", "inshop", "--data.root", str(inshop / "Eval"),
                             "--logger", "none"], ["one level too deep", f"--data.root '{inshop}'"]),
    ]


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "DML_BENCHMARK_DATA": str(tmp / "data"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DML_BENCHMARK_RUN_DIR", None)
    return env


def _check(case: str, code: int, out: str, left: list[str], fragments: list[str]) -> None:
    assert code == 2, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    for fragment in fragments:
        assert fragment in out, (fragment, out[-2000:])
    assert "error:" in out and len(out.splitlines()) <= 12, out  # a paragraph, not pages of usage
    assert "[benchmark] run directory" not in out, out[-2000:]  # failed before the trainer could pass over data
    assert not [p for p in left if p.startswith("runs")], left  # no run directory behind


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[list[str], list[str]]]]:
    tmp = tmp_path_factory.mktemp("user-errors")
    return tmp, {name: (args, frags) for name, args, frags in _cases(tmp)}


CASE_IDS = [
    "unknown-method", "unknown-dataset", "unknown-backbone", "option-typo", "model-option-typo", "weights-missing",
    "weights-list", "weights-text", "run-dir-is-a-file", "run-dir-unwritable", "checkpoint-missing",
    "checkpoint-truncated", "lr-zero", "lr-negative", "too-many-classes", "samples-per-class-0", "image-size-0",
    "dataset-missing", "inshop-too-deep", "cia-blocks-negative", "evaluation-backend", "augment-crop",
    "checkpoint-top-k",
]


@pytest.mark.parametrize("case", CASE_IDS)
def test_user_error_exits_2_with_the_cause_and_no_traceback(
    cases, case: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every case through the CLI's ``main`` in this process (what ``python -m benchmark`` runs).

    In-process keeps the table cheap: a fresh interpreter costs ~10 s of imports per case on
    a 2-core machine. An exception escaping ``main`` fails the test, as a traceback would.
    """
    tmp, table = cases
    args, fragments = table[case]
    cwd = tmp / "cwd-in-process" / case
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    for key, value in _env(tmp).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("DML_BENCHMARK_RUN_DIR", raising=False)
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse-level errors exit from inside the parser
        code = exit_.code
    out, err = capfd.readouterr()
    _check(case, code, out + err, [str(p.relative_to(cwd)) for p in cwd.rglob("*")], fragments)


SUBPROCESS_CASES = ["option-typo", "inshop-too-deep"]


def _run_subprocess(case: str, args: list[str], tmp: Path) -> tuple[int, str, float, list[str]]:
    cwd = tmp / "cwd" / case
    cwd.mkdir(parents=True)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmark", *args], cwd=cwd, env=_env(tmp), capture_output=True,
                          text=True, timeout=300)
    elapsed = time.monotonic() - start
    left = [str(p.relative_to(cwd)) for p in cwd.rglob("*")]
    return proc.returncode, proc.stdout + proc.stderr, elapsed, left


@pytest.mark.slow  # ~15 s of subprocesses; every message is checked in-process above, and the suite tests
# run a real `fit` subprocess that exits 2 with its message recorded
def test_the_real_command_exits_2_with_the_message_alone(cases) -> None:
    """A few cases (option parsing; dataset checks) through a real
    ``python -m benchmark`` process, run in parallel: the exit status and the text users see."""
    tmp, table = cases
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(SUBPROCESS_CASES, pool.map(lambda c: _run_subprocess(c, table[c][0], tmp), SUBPROCESS_CASES)))
    for case, (code, out, elapsed, left) in done.items():
        _check(case, code, out, left, table[case][1])
        assert elapsed < BOUND_S, f"{case} took {elapsed:.1f} s"


def test_a_bug_in_a_constructor_is_a_failure_not_a_user_error(cases, monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors are classified by type (#27): a plain ValueError raised by a constructor is a bug and escapes
    ``main`` (the entry point prints its traceback, exit 1); only a UserError is exit 2."""
    tmp, table = cases
    base = table["lr-zero"][0][:-2]  # fit --method ms ... without --model.lr 0
    args = [*base[:2], "bug_in_init", *base[3:]]
    monkeypatch.chdir(tmp)
    with pytest.raises(ValueError, match="num_heads must be >= 1") as raised:
        main([*args, "--plugin", "tests.benchmark.plugin_methods"])
    assert not isinstance(raised.value, UserError)
