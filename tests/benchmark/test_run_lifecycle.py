"""A run's life through the real CLI: its folder, status, exit codes, checkpoints, resuming,
and evaluating a checkpoint with the settings it was trained with.

Signals are sent to a real ``python -m benchmark fit`` subprocess; everything else drives
``main()`` in-process with a tiny ResNet on the official-layout CUB fixture.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import benchmark.__main__ as entry
from benchmark.app import builder
from benchmark.app.cli import main
from benchmark.engine.evaluation import retrieval_metrics
from tests.benchmark.plugin_methods import peak_refinement
from tests.datamodules import fixtures

REPO = Path(__file__).resolve().parents[2]
PLUGIN = ["--plugin", "tests.benchmark.plugin_methods"]
# float32: tiny fits give the same numbers on every CPU (``auto`` is bf16 autocast on CPUs with native
# bf16, where this 16-px conv net gave NaN gradients: 2-core AMD EPYC with AVX512-BF16).
TINY = ["--backbone", "resnet_tiny_test", "--backbone.pretrained", "false", "--model.embedding_dim", "8",
        "--trainer.precision", "32-true"]  # fmt: skip


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent


def _args(cub_root: Path, *extra: str, method: str = "ms") -> list[str]:
    return [
        "--method", method, "--data", "cub", "--data.root", str(cub_root), "--recipe", "none", *TINY,
        "--data.image_size", "16", "--data.classes_per_batch", "4", "--data.samples_per_class", "2",
        "--data.num_workers", "0", "--data.eval_batch_size", "128", "--data.verify_images", "none",
        "--trainer.enable_progress_bar", "false", *extra,
    ]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- checkpoint selection
@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_holdout_tests_the_checkpoint_best_by_the_methods_selection_metric(cub_root: Path, tmp_path: Path) -> None:
    """The plain val/R@1 never changes; the refined one peaks after epoch 2: that is tested."""
    run = tmp_path / "run"
    code = main(["fit", *PLUGIN, *_args(cub_root, method="refine_peak"), "--model.peak", "2",
                 "--model.weight_decay", "0", "--data.protocol", "holdout", "--data.batches_per_epoch", "2",
                 "--trainer.max_epochs", "4", "--logger", "none", "--run_dir", str(run)])
    assert code == 0
    val = _json(run / "metrics_val.json")["evaluations"]
    plain = {e["metrics"]["R@1"] for e in val}
    refined = [e["refined"]["refined"]["R@1"] for e in val[1:]]  # after epochs 0..3
    assert len(plain) == 1  # constant: a selection by val/R@1 would keep epoch 0
    assert refined.index(max(refined)) == 2 and refined[2] > refined[1] > refined[0] and refined[3] < refined[2]
    test = _json(run / "metrics_test.json")
    assert test["selection_metric"] == "val/refined/R@1"
    assert test["checkpoint"]["epoch"] == 2 and "val/refined/R@1" in test["checkpoint"]["selected_by"]
    assert Path(test["checkpoint"]["path"]).name.startswith("best-2-")
    # The test split's refined metrics are those of the peak's refinement (weight 1), not epoch 0's (weight 0).
    labels = torch.arange(101, 201).repeat_interleave(3)  # the fixture's test classes, 3 images each
    flags = torch.ones(300, dtype=torch.bool)
    peak = retrieval_metrics(peak_refinement(labels, 1.0), labels, flags, flags, recall_ks=(1, 2, 4, 8))
    first = retrieval_metrics(peak_refinement(labels, 0.0), labels, flags, flags, recall_ks=(1, 2, 4, 8))
    assert test["refined"]["refined"]["R@1"] == peak["R@1"] > first["R@1"]
    assert test["refined"]["refined"]["MAP@R"] == peak["MAP@R"]


# ---------------------------------------------------------------------------- folders, status, resume
@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_runs_started_in_the_same_second_get_their_own_folders(
    cub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builder.time, "strftime", lambda fmt: "20260101-000000")
    monkeypatch.delenv("DML_BENCHMARK_RUN_DIR", raising=False)
    for seed in ("1", "2"):
        assert main(["fit", *_args(cub_root), "--data.batches_per_epoch", "1", "--trainer.max_epochs", "1",
                     "--logger", "csv", "--seed_everything", seed]) == 0
        monkeypatch.delenv("DML_BENCHMARK_RUN_DIR", raising=False)
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == [
        "ms-cub-resnet_tiny_test-20260101-000000", "ms-cub-resnet_tiny_test-20260101-000000-2"
    ]
    for run, seed in zip(runs, (1, 2)):
        assert _json(run / "metrics_test.json")["seed"] == seed
        assert _json(run / "status.json")["status"] == "completed"
        assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_the_fit_reports_and_records_its_start_up_to_the_first_step(cub_root: Path, tmp_path: Path, capsys,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """#27: the time from the process's start to the first training step (imports, data, model, the
    evaluation before training), printed and kept in status.json; through the real entry point."""
    run = tmp_path / "run"
    monkeypatch.setenv("DML_BENCHMARK_STARTED", "0")  # the entry point overwrites it with its own start
    assert entry.main(["fit", *_args(cub_root), "--data.batches_per_epoch", "2", "--trainer.max_epochs", "1",
                       "--logger", "none", "--run_dir", str(run)]) == 0  # fmt: skip
    recorded = _json(run / "status.json")
    assert recorded["status"] == "completed" and 0 < recorded["first_step_s"] < 600
    assert f"first training step {recorded['first_step_s']:.1f} s after start" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_fit_refuses_a_run_directory_that_holds_another_run(cub_root: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = ["fit", *_args(cub_root), "--data.batches_per_epoch", "1", "--trainer.max_epochs", "1", "--logger", "none"]
    assert main([*args, "--run_dir", str(run)]) == 0
    before = (run / "metrics_test.json").read_text()
    assert main([*args, "--run_dir", str(run), "--seed_everything", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--ckpt_path" in err and "Traceback" not in err
    assert (run / "metrics_test.json").read_text() == before  # nothing written into it


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_resume_continues_the_run_folder_without_a_new_untrained_evaluation(cub_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = ["fit", *_args(cub_root), "--data.batches_per_epoch", "3", "--logger", "csv"]
    assert main([*base, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "2",
                 "--run_dir", str(run)]) == 0
    first = _json(run / "metrics_val.json")["evaluations"]
    assert [e["global_step"] for e in first] == [0, 6]
    rows_before = (run / "metrics.csv").read_text().strip().splitlines()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 6

    assert main([*base, "--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "2",
                 "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    evaluations = _json(run / "metrics_val.json")["evaluations"]
    assert [e["global_step"] for e in evaluations] == [0, 6, 12]  # no second step-0 entry
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 12 and state["epoch"] == 3
    rows_after = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows_after) > len(rows_before)  # the first part of the log is kept
    steps = [r.split(",") for r in rows_after[1:]]
    assert any("5" in r for r in steps[: len(rows_before) - 1])
    assert not list(tmp_path.glob("runs"))  # no second folder
    assert _json(run / "status.json")["status"] == "completed"


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_last_checkpoint_is_written_every_epoch_even_without_validation(cub_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["fit", *_args(cub_root), "--data.batches_per_epoch", "2", "--trainer.max_epochs", "3",
                 "--trainer.check_val_every_n_epoch", "4", "--trainer.max_steps", "3", "--logger", "none",
                 "--run_dir", str(run)]) == 0
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3  # written after epoch 1 though no validation ran since step 0


# ---------------------------------------------------------------------------- test --ckpt_path
@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_test_of_a_checkpoint_uses_the_runs_own_settings(cub_root: Path, tmp_path: Path, capsys) -> None:
    """The run trained on 32 px under holdout; the recipe-free default would be 224 px, paper."""
    run = tmp_path / "run"
    assert main(["fit", *_args(cub_root), "--data.image_size", "32", "--data.protocol", "holdout",
                 "--data.batches_per_epoch", "2", "--trainer.max_epochs", "1", "--logger", "none",
                 "--run_dir", str(run)]) == 0
    trained = _json(run / "metrics_test.json")
    last = run / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["test", "--ckpt_path", str(last), "--trainer.enable_progress_bar", "false"]) == 0
    out = capsys.readouterr()
    assert f"config: {run / 'config.yaml'}" in out.err
    assert "R@1" in out.out and "DataLoader 0" not in out.out + out.err  # one table: the evaluator's
    tested = _json(run / "metrics_test.json")
    assert tested["image_size"] == 32 and tested["protocol"] == "holdout"
    later = tested["evaluations"][-1]
    assert later["metrics"] == trained["metrics"]  # the same model on the same data
    assert later["checkpoint"]["path"] == str(last) and later["checkpoint"]["global_step"] == 2
    assert later["checkpoint"]["selected_by"] == "last checkpoint" and later["role"] == "checkpoint"
    assert len(tested["evaluations"]) == 2  # recorded in the run, after the fit's own test
    # The run's headline stays its end-of-training evaluation (here: the checkpoint selected on the holdout split).
    assert tested["checkpoint"] == trained["checkpoint"] and tested["evaluations"][0]["role"] == "final"
    assert (run / "config_test.yaml").is_file() and "image_size: 32" in (run / "config.yaml").read_text()
    # An explicit option still wins over the run's config.
    assert main(["test", "--ckpt_path", str(last), "--data.eval_batch_size", "7",
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert "eval_batch_size: 7" in (run / "config_test.yaml").read_text()
    assert main(["test", "--ckpt_path", str(last), "--method", "margin"]) == 2
    assert "differs from the run" in capsys.readouterr().err


def test_missing_checkpoint_is_named_before_anything_else(capsys) -> None:
    assert main(["test", "--method", "ms", "--ckpt_path", "nope.ckpt"]) == 2
    err = capsys.readouterr().err
    assert "nope.ckpt" in err and "does not exist" in err


# ---------------------------------------------------------------------------- signals
def _start_fit(cub_root: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    run, marker = tmp_path / "run", tmp_path / "marker"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DML_BENCHMARK_DATA": str(tmp_path / "data"),
           "PYTHONWARNINGS": "ignore"}
    env.pop("DML_BENCHMARK_RUN_DIR", None)
    cmd = [sys.executable, "-m", "benchmark", "fit", *PLUGIN, *_args(cub_root, method="step_marker"),
           "--model.marker", str(marker), "--model.marker_step", "3", "--data.batches_per_epoch", "400",
           "--trainer.max_epochs", "1", "--logger", "none", "--run_dir", str(run), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, run, marker


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"fit ended before {path.name} appeared:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.1)


@pytest.mark.parametrize(("signum", "code", "name"), [
    (signal.SIGTERM, 143, "SIGTERM"),  # a cluster's preemption: in the default run
    pytest.param(signal.SIGINT, 130, "SIGINT", marks=pytest.mark.slow),  # Ctrl-C: the same path, 13 s more
])
@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_a_signalled_fit_stops_saves_last_ckpt_and_exits_non_zero(
    cub_root: Path, tmp_path: Path, signum: int, code: int, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, run, marker = _start_fit(cub_root, tmp_path)
    _wait_for(marker, proc)  # at least 3 optimizer steps taken, the epoch has 400
    assert _json(run / "status.json")["status"] == "running"
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    status = _json(run / "status.json")
    assert status["status"] == "interrupted" and status["exit_code"] == code and name in status["reason"]
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    stopped_at = state["global_step"]
    assert 3 <= stopped_at < 400 and state["optimizer_states"]
    assert not (run / "metrics_test.json").exists()  # an interrupted fit is not tested
    assert not list((run / "checkpoints").glob(".*.tmp"))

    if signum == signal.SIGTERM:  # resuming (in this process: the signal path is what needed one) continues
        monkeypatch.setenv("DML_BENCHMARK_DATA", str(tmp_path / "data"))
        assert main(["fit", *PLUGIN, *_args(cub_root, method="step_marker"), "--data.batches_per_epoch", "400",
                     "--trainer.max_epochs", "1", "--trainer.max_steps", str(stopped_at + 2), "--logger", "none",
                     "--ckpt_path", str(last)]) == 0
        state = torch.load(last, map_location="cpu", weights_only=False)
        assert state["global_step"] == stopped_at + 2
        assert _json(run / "status.json")["status"] == "completed"


@pytest.mark.slow  # two DDP processes on the CPU: about 20 s on 2 cores
@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_sigterm_to_a_ddp_fits_first_process_stops_every_rank_and_saves(cub_root: Path, tmp_path: Path) -> None:
    """A suite's job sends SIGTERM to its fit's process only (no longer to its process group): the
    DDP workers Lightning started must stop with it, the checkpoint be written, and no process be
    left behind (Lightning's SIGTERM handler relays the signal to them)."""
    proc, run, marker = _start_fit(cub_root, tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                                   "--trainer.strategy", "ddp")
    _wait_for(marker, proc, timeout=240)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no DDP worker process"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, out[-3000:]
    status = _json(run / "status.json")
    assert status["status"] == "interrupted" and status["exit_code"] == 143
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 3 <= state["global_step"] < 400
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a DDP worker outlived its fit"


# ---------------------------------------------------------------------------- divergence
@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_a_non_finite_loss_fails_the_run_and_keeps_the_last_good_checkpoint(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = main(["fit", *PLUGIN, *_args(cub_root, method="nan_at_step"), "--model.nan_step", "4",
                 "--data.batches_per_epoch", "3", "--trainer.max_epochs", "3", "--logger", "none",
                 "--run_dir", str(run)])
    assert code == 1
    err = capsys.readouterr().err
    assert "training diverged at step 4: non-finite loss" in err and "Traceback" not in err
    status = _json(run / "status.json")
    assert status["status"] == "failed" and status["exit_code"] == 1 and "diverged" in status["reason"]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3  # epoch 0's checkpoint, written before the NaN, intact
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (run / "metrics_test.json").exists()


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_exploding_weights_with_a_finite_loss_are_caught(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """AdamW at lr 1e6: the weight decay multiplies the weights by -99 per step; the loss on
    L2-normalised embeddings stays finite, the parameter norm overflows float32 first (checked at
    the logging steps, every 10 steps here)."""
    run = tmp_path / "run"
    code = main(["fit", *_args(cub_root), "--model.lr", "1e6", "--model.weight_decay", "1e-4",
                 "--data.batches_per_epoch", "40", "--trainer.max_epochs", "1", "--logger", "none",
                 "--run_dir", str(run)])
    assert code == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "non-finite parameter norm" in err and "since the last check" in err
    assert _json(run / "status.json")["status"] == "failed"


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_a_resumed_fit_continues_its_wandb_run(cub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    base = ["fit", *_args(cub_root), "--data.batches_per_epoch", "1", "--logger", "wandb"]
    assert main([*base, "--trainer.max_epochs", "1", "--run_dir", str(run)]) == 0
    first = {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(first) == 1
    assert main([*base, "--trainer.max_epochs", "2", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    ids = {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}
    assert ids == first  # the same W&B run id, not a second run


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_a_run_cut_short_by_max_time_says_so(cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code = main(["fit", *PLUGIN, *_args(cub_root, method="step_marker"), "--model.marker", str(tmp_path / "m"),
                 "--model.marker_step", "0", "--model.sleep_s", "0.6", "--data.batches_per_epoch", "50",
                 "--trainer.max_epochs", "1", "--trainer.max_time", "00:00:00:01", "--logger", "none",
                 "--run_dir", str(run)])
    assert code == 0
    err = capsys.readouterr().err
    assert "training stopped by the time budget (trainer.max_time) after" in err and "of 50 steps" in err
    status = _json(run / "status.json")
    assert status["status"] == "completed" and "time budget" in status["reason"]
    assert _json(run / "metrics_test.json")["checkpoint"]["global_step"] < 50
