"""``perf embed``: the evaluation loop through a real ``trainer.test``, against the loader alone and
the forward alone on the same batches (the CPU path CI keeps alive)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from benchmark.app.cli import main


def test_perf_embed_times_the_loop_and_its_parts(tmp_path: Path, capsys) -> None:
    out = tmp_path / "embed.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["perf", "embed", "--tiny", "--method", "ms", "--workers", "0", "--out", str(out),
                     "--data.decoder", "pil"]) == 0
    printed = capsys.readouterr().out
    assert "forward alone" in printed and "data alone" in printed
    payload = json.loads(out.read_text())
    assert payload["images"] == 2 * 64  # --tiny: 2 batches of 64
    assert payload["data"]["images_per_second"] > 0 and payload["forward"]["images_per_second"] > 0
    assert [loop["workers"] for loop in payload["loop"]] == [0]
    for loop in payload["loop"]:
        assert loop["seconds"] > 0 and loop["metrics_seconds"] > 0
        assert loop["images_per_second"] == payload["images"] / loop["seconds"]


def test_perf_embed_split_val_times_the_loop_on_the_validation_split(tmp_path: Path) -> None:
    """--split val measured the data and the forward on val, but the loop on test (its rate divided
    val's image count by test's time): the loop now evaluates the split asked for."""
    out = tmp_path / "embed.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["perf", "embed", "--tiny", "--method", "ms", "--workers", "0", "--split", "val", "--batches", "1",
                     "--out", str(out), "--data.decoder", "pil"]) == 0
    payload = json.loads(out.read_text())
    (loop,) = payload["loop"]
    assert loop["stage"] == "val" and loop["images"] == payload["images"] == 64
    assert loop["images_per_second"] == loop["images"] / loop["seconds"]
