"""``perf train``: the bare loop it compares against takes exactly the steps ``fit`` takes, and the
command runs end to end (the CPU path CI keeps alive)."""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch

from benchmark.app.cli import build_cli, main
from benchmark.app.perf import train as perf_train


def _build(method: str, run_dir: Path, steps: int):
    args = argparse.Namespace(warmup=0, steps=steps - 1, tiny=True, real_batch=None, logger="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_cli("fit", perf_train._cli_args(method, args, run_dir, ["--data.decoder", "pil"]), run=False)


def test_the_bare_loop_takes_the_same_steps_as_fit(tmp_path: Path) -> None:
    """From the same weights over the same batches, Lightning's fit and the bare loop end at the
    same weights: the comparison times the same work (forward, loss, backward, clipping,
    optimizer and scheduler steps), and only the framework's own work differs."""
    steps = 4
    cli = _build("ms", tmp_path / "fit", steps)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    dm.apply_request(model.data_request())
    batches = perf_train._in_memory(dm, steps)
    assert len(batches) == steps and len(batches[0]["label"]) > 1
    dm.train_dataloader = lambda: perf_train.InMemoryBatches(batches)
    start = copy.deepcopy(model.state_dict())
    clock = perf_train.StepClock()
    trainer.callbacks.append(clock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    assert len(clock.stamps) == steps
    after_fit = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(after_fit[k], start[k]) for k in start)  # it trained

    model.load_state_dict(start)
    times = perf_train.bare_loop(model, batches + batches[:1], steps, 0, torch.device("cpu"),
                                 trainer.precision_plugin.forward_context,
                                 perf_train.clip_norm(trainer))
    assert len(times) == steps and all(t > 0 for t in times)
    assert perf_train.clip_norm(trainer) == 3.0  # the recipe clips: so does the bare loop
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, after_fit[name], rtol=1e-5, atol=1e-6)


def test_perf_train_runs_and_writes_its_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "train.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["perf", "train", "--tiny", "--methods", "ms", "--sources", "memory", "--logger", "none",
                     "--out", str(out), "--data.decoder", "pil"]) == 0
    printed = capsys.readouterr().out
    assert "framework ms/step" in printed and "CPU:" in printed
    payload = json.loads(out.read_text())
    rows = {(r["method"], r["source"]) for r in payload["results"]}
    assert rows == {("ms", "memory")}  # the embedded source and other methods: test_perf_gpu.py's CPU run
    for r in payload["results"]:
        assert len(r["bare"]) == 3 and len(r["framework"]) == 3 and r["bare_mean_s"] > 0 and r["framework_mean_s"] > 0
        assert r["overhead"] == r["framework_mean_s"] / r["bare_mean_s"] - 1


def test_a_step_without_images_is_timed_with_a_tiny_bank_encoder_and_the_recipes_trained_model(tmp_path: Path) -> None:
    """Context-Refine trains on a bank of embeddings made before the first step: perf train embeds
    it with a tiny encoder (seconds, not minutes) but keeps the recipe's embedding size, so the
    step trains the same parameters as the recipe's model with its own backbone."""
    out = tmp_path / "train.json"
    small = ["--model.embedding_dim", "24", "--data.image_size", "16", "--data.num_workers", "0", "--data.decoder", "pil"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert perf_train.main(["--methods", "context_refine", "--sources", "memory", "--steps", "1", "--warmup", "0",
                                "--rounds", "1", "--logger", "none", "--out", str(out), *small]) == 0
        recipe = build_cli("fit", ["--method", "context_refine", "--data", "synthetic", "--backbone.pretrained", "false",
                                   "--run_dir", str(tmp_path / "recipe"), "--logger", "none", *small], run=False)
    (result,) = json.loads(out.read_text())["results"]
    assert "tiny encoder" in result["note"] and len(result["bare"]) == 1
    assert recipe.model.backbone_config.name != "resnet_tiny_test"
    # The swap keeps the model's embedding size (without --model.embedding_dim, the backbone's:
    # 2048 for the recipe's ResNet-50), which sizes the refiner the step trains.
    assert perf_train.bank_encoder_args(recipe.model)[-2:] == ["--model.embedding_dim", "24"]
    optimizer = recipe.model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    trained = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert result["trained_params"] == trained > 0


def test_perf_train_rejects_unknown_methods_and_sources(capsys) -> None:
    import pytest

    from benchmark.app.cli import main

    # Through the command line: a user error (exit 2, one line naming the registered methods), not a traceback.
    assert main(["perf", "train", "--methods", "nope", "--tiny"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) nope" in err and "dmcac" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        perf_train.main(["--sources", "disk", "--tiny"])
