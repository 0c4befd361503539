"""Test-wide settings: never touch the network, the user's caches or W&B servers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# The figures after a test cost ~1-2 s per tiny run; the many fits of the suite do without them, and
# tests/benchmark/test_figures.py asks for them explicitly (--figures.*, or the variable unset).
os.environ.setdefault("DML_BENCHMARK_FIGURES", "false")


@pytest.fixture(autouse=True)
def _isolated_data_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Datasets, verification stamps and caches go to a per-session temporary folder."""
    root = tmp_path_factory.getbasetemp() / "dml-data"
    monkeypatch.setenv("DML_BENCHMARK_DATA", str(root))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
