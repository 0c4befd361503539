"""The Cross-Image-Attention figure commands run end to end through ``python -m benchmark analyze``."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch

from benchmark.app.cli import main

TINY = [
    "--backbone", "resnet_tiny_test", "--backbone.pretrained", "false", "--model.embedding_dim", "16",
    "--model.num_blocks", "2", "--data.num_workers", "0", "--logger", "none",
    "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true",
]  # fmt: skip


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow  # ~35 s: trains two models; the attention maps also run in test_figures.py (2 s)
def test_gradient_and_attention_figures(tmp_path: Path) -> None:
    out = tmp_path / "figs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grad_args = ["--epochs", "0,1", "--out", str(out), "--trainer.max_epochs", "2", "--data.batches_per_epoch", "2"]
        assert main(["analyze", "cross_image_attention", "gradients", *grad_args, *TINY]) == 0
        summary = json.loads((out / "cia_gradients.json").read_text())
        assert set(summary) == {"0", "1", "baseline"}
        assert summary["baseline"]["kind"] == "matched" and "MS loss x 2" in summary["baseline"]["caption"]
        baseline_ckpt = torch.load(out / "run_baseline" / "checkpoints" / "last.ckpt", weights_only=False)
        assert baseline_ckpt["hyper_parameters"]["num_blocks"] == 0
        assert baseline_ckpt["hyper_parameters"]["unconditional_weight"] == 2.0  # ours: 1 + 1
        for epoch in (summary["0"], summary["1"]):  # both models recorded finite, non-empty log-gradients
            for model in ("baseline", "cross_image_attention"):
                assert epoch[model]["values"] > 0 and -30 < epoch[model]["median"] < 5
        assert min(png_size(out / "cia_gradients.png")) > 100

        ckpt = out / "run_cross_image_attention" / "checkpoints" / "last.ckpt"
        att_args = ["--ckpt", str(ckpt), "--blocks", "1,2", "--num-triples", "2", "--out", str(out)]
        assert main(["analyze", "cross_image_attention", "attention", *att_args, *TINY]) == 0
    figures = sorted(out.glob("cia_attention_test_*.png"))
    assert len(figures) == 2 and all(min(png_size(f)) > 100 for f in figures)
