"""Precision by hardware (the probe mocked both ways) and atomic checkpoint writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark.app.cli import main
from benchmark.engine import training
from benchmark.engine.training import AtomicCheckpointIO, BenchmarkTrainer, resolve_precision
from tests.datamodules import fixtures


@pytest.fixture()
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("native", "expected"), [((True, "AMX"), "bf16-mixed"), ((True, "AVX512-BF16"), "bf16-mixed"), ((False, "AVX2"), "32-true")]
)
def test_auto_precision_on_cpu_follows_native_bfloat16(
    cpu_only: None, monkeypatch: pytest.MonkeyPatch, native: tuple[bool, str], expected: str
) -> None:
    monkeypatch.setattr(training, "cpu_native_bf16", lambda: native)
    precision, reason = resolve_precision("auto", "auto")
    assert precision == expected and native[1] in reason
    assert resolve_precision(None, "cpu")[0] == expected  # unset means auto
    assert resolve_precision("16-mixed", "cpu") == ("16-mixed", "set explicitly")  # explicit always wins
    assert resolve_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_on_cuda_follows_device_support(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Test GPU")
    monkeypatch.setattr(training, "cpu_native_bf16", lambda: pytest.fail("the CPU must not decide for a GPU run"))
    assert resolve_precision("auto", "auto")[0] == expected
    assert resolve_precision("auto", "gpu")[0] == expected
    monkeypatch.setattr(training, "cpu_native_bf16", lambda: (False, "AVX2"))
    assert resolve_precision("auto", "cpu")[0] == "32-true"  # accelerator cpu on a GPU machine


def test_cpu_probe_reads_cpuinfo_when_torch_has_no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(training, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert training.cpu_native_bf16() == (True, "AVX512-BF16")
    monkeypatch.setattr(training, "_cpu_flags", lambda: {"avx2", "fma"})
    assert training.cpu_native_bf16()[0] is False


def test_trainer_accepts_auto_and_records_the_choice(cpu_only: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "cpu_native_bf16", lambda: (False, "AVX2"))
    trainer = BenchmarkTrainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.precision == "32-true"
    assert trainer.precision_choice == {"requested": "auto", "precision": "32-true", "reason": resolve_precision("auto")[1]}
    monkeypatch.setattr(training, "cpu_native_bf16", lambda: (True, "AMX"))
    assert BenchmarkTrainer(logger=False, enable_checkpointing=False).precision == "bf16-mixed"
    assert BenchmarkTrainer(precision="32-true", logger=False, enable_checkpointing=False).precision == "32-true"


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_cli_prints_and_records_the_precision(
    cpu_only: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(training, "cpu_native_bf16", lambda: (False, "AVX2"))
    root = fixtures.make_cub(tmp_path / "cub", classes=200, per_class=2).parent
    run = tmp_path / "run"
    code = main([
        "fit", "--method", "ms", "--data", "cub", "--data.root", str(root), "--recipe", "none",
        "--backbone", "resnet_tiny_test", "--backbone.pretrained", "false", "--data.image_size", "16",
        "--data.classes_per_batch", "4", "--data.samples_per_class", "2", "--data.batches_per_epoch", "1",
        "--data.num_workers", "0", "--trainer.max_epochs", "1", "--logger", "none", "--run_dir", str(run),
        "--trainer.enable_progress_bar", "false",
    ])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("[benchmark] precision: 32-true (auto: the CPU has no native bfloat16 (AVX2") == 1
    assert json.loads((run / "metrics_test.json").read_text())["precision"] == "32-true"
    assert "precision: auto" in (run / "config.yaml").read_text()


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    assert torch.load(target, weights_only=False) == {"step": 1}

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False) == {"step": 1}  # the last good one is intact
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind



def test_per_step_terms_are_logged_only_when_written_and_the_loggers_get_the_same_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The method base logs its terms (and the gradient norm) only at the steps Lightning writes:
    the CSV logger still gets a row at every ``log_every_n_steps``-th step, holding that step's
    own loss (recorded here as the method computed it)."""
    import csv
    import warnings

    from benchmark.core import contracts
    from methods.baselines import MultiSimilarity

    losses: list[float] = []
    real = MultiSimilarity.training_loss

    def spy(self, batch):
        terms = real(self, batch)
        losses.append(float(terms["loss"]))
        return terms

    monkeypatch.setattr(MultiSimilarity, "training_loss", spy)
    root = fixtures.make_cub(tmp_path / "cub", classes=200, per_class=2).parent
    run = tmp_path / "run"
    args = ["fit", "--method", "ms", "--data", "cub", "--data.root", str(root), "--recipe", "none",
            "--backbone", "resnet_tiny_test", "--backbone.pretrained", "false", "--model.embedding_dim", "8",
            "--data.image_size", "16", "--data.num_workers", "0", "--data.classes_per_batch", "4",
            "--data.samples_per_class", "2", "--data.batches_per_epoch", "5", "--trainer.max_epochs", "2",
            "--trainer.log_every_n_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
            "false", "--figures", "false", "--logger", "csv", "--run_dir", str(run), "--trainer.precision", "32-true"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    with open(run / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == 10
    assert [int(r["step"]) for r in rows] == [2, 5, 8]  # steps 3, 6 and 9, as Lightning writes them
    for row in rows:
        assert float(row["train/loss"]) == pytest.approx(losses[int(row["step"])], rel=1e-6)
    assert all(row["train/grad_norm"] for row in rows)  # logged at the same steps
    assert contracts.logs_this_step(None) is True


def test_log_every_n_steps_0_turns_step_logging_off(tmp_path: Path) -> None:
    """An epoch shorter than log_every_n_steps is logged once an epoch (so train/loss reaches the
    loggers; test_wandb checks it), but 0, which turns Lightning's step logging off, was read as
    the default 50 and turned back on (one train/loss row per epoch)."""
    import csv
    import warnings

    run = tmp_path / "run"
    args = ["fit", "--method", "ms", "--backbone", "resnet_tiny_test", "--backbone.pretrained", "false",
            "--data.batches_per_epoch", "3", "--data.num_workers", "0", "--trainer.max_epochs", "1",
            "--trainer.log_every_n_steps", "0", "--trainer.enable_progress_bar", "false", "--figures", "false",
            "--logger", "csv", "--run_dir", str(run), "--trainer.precision", "32-true"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and not any(row.get("train/loss") for row in rows)  # the epoch's evaluations only
