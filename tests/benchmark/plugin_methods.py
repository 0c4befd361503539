"""Test-only methods, loaded into the CLI with ``--plugin tests.benchmark.plugin_methods``.

* ``step_marker``: the Multi-Similarity baseline that touches a file once it has taken a
  given number of optimizer steps and then slows down, so that a test can signal a fit
  mid-epoch (after training has started, before the epoch ends).
* ``nan_at_step``: the Multi-Similarity baseline whose loss becomes NaN from a given step on.
* ``bug_in_init``: the Multi-Similarity baseline whose constructor builds an attention block with
  0 heads, a programming error (a plain ValueError from benchmark/nn/attention.py): the command line must report it as a failure (a traceback, exit 1), not
  as a user error, which only a ``UserError`` (``ConfigError``...) is.
* ``refine_peak``: a method judged by its refined output (``val/refined/R@1``), whose plain
  embeddings never change (lr 0) and whose refinement improves for ``peak`` epochs and then
  degrades, so the epoch that a correct checkpoint selection picks is known in advance.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmark.core.contracts import register_method, register_perf
from benchmark.nn.attention import Attention
from methods.base import RetrievalMethod
from methods.baselines import MultiSimilarity


@register_method("step_marker")
class StepMarker(MultiSimilarity):
    """MS loss; writes ``marker`` after ``marker_step`` optimizer steps, then sleeps per step."""

    def __init__(self, marker: str = "", marker_step: int = 2, sleep_s: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker, self.marker_step, self.sleep_s = marker, marker_step, sleep_s

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.marker and self.global_step >= self.marker_step:
            Path(self.marker).touch()
            time.sleep(self.sleep_s)


@register_method("nan_at_step")
class NanAtStep(MultiSimilarity):
    """MS loss, multiplied by NaN from optimizer step ``nan_step`` on."""

    def __init__(self, nan_step: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_step = nan_step

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        terms = super().training_loss(batch)
        if self.global_step >= self.nan_step:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


@register_method("bug_in_init")
class BugInInit(MultiSimilarity):
    """MS loss whose constructor fails the way a bug does (not a checked option)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # A building block called wrongly: its ValueError comes from the project's own code
        # (benchmark/nn/attention.py), which the command line once took for a user error by its path.
        self.attention = Attention(num_heads=0)


@register_method("refine_peak")
class RefinePeak(RetrievalMethod):
    """Constant plain embeddings; refined embeddings best after ``peak`` training epochs.

    The refinement mixes fixed random vectors with one-hot class vectors (an oracle the test
    method reads from its datamodule, which a real method never may) with a weight that
    rises until epoch ``peak`` and falls after it.
    """

    selection_metric = "val/refined/R@1"

    def __init__(self, peak: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.peak = peak
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        pooled = self.encode(batch["image"]).pooled
        return {"loss": pooled.sum() * 0.0}

    def on_train_epoch_end(self) -> None:
        self.epochs_done += 1

    def weight(self, epochs: int) -> float:
        return epochs / self.peak if epochs <= self.peak else max(0.0, 1.0 - (epochs - self.peak) / self.peak)

    def refine(self, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor) -> dict[str, Any]:
        dm = self.trainer.datamodule
        records = dm.val_records if embeddings.shape[0] == len(dm.val_records) else dm.test_records
        return {"": peak_refinement(torch.as_tensor(records.labels), self.weight(int(self.epochs_done)))}


def peak_refinement(labels: torch.Tensor, weight: float) -> torch.Tensor:
    """(N,) labels -> (N, C) fixed noise + ``4 * weight`` x one-hot class vectors, L2-normalised."""
    oracle = F.one_hot(labels - labels.min()).float()  # (N, C)
    noise = torch.randn(labels.shape[0], oracle.shape[1], generator=torch.Generator().manual_seed(0))
    return F.normalize(noise + 4.0 * weight * oracle, dim=-1)


@register_perf("plugin_echo", "test-only: prints its arguments")
def echo(argv: list[str]) -> int:
    print("echo", *argv)
    return 0
