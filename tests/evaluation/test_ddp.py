"""DDP on CPU (2 processes, gloo): the callback's metrics equal a single-process run exactly.

One ``torch.multiprocessing.spawn`` runs two Lightning trainers per rank (Lightning sees
``LOCAL_RANK`` and does not launch processes itself):

* the default ``DistributedSampler``, which pads 23 samples to 24 with a duplicate;
* a rank-dependent sampler with uneven, overlapping shards (15 and 13 samples, 5 shared).
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Subset

from benchmark.engine.evaluation import RetrievalEvaluator, nmi, retrieval_metrics
from tests.evaluation.toy import ToyDataModule, ToyDataset, ToyMethod, toy_split

WORLD = 2


class CheckedToyMethod(ToyMethod):
    """Refine must see every sample on every rank, and may use collectives."""

    def refine(self, embeddings, is_query, is_gallery):
        assert dist.is_initialized() and dist.get_world_size() == WORLD
        assert embeddings.shape[0] == self.oracle.numel(), "refine did not get the full gathered set"
        total = torch.tensor([embeddings.shape[0]])
        dist.all_reduce(total)  # a collective works because every rank calls refine
        assert int(total) == WORLD * self.oracle.numel()
        return super().refine(embeddings, is_query, is_gallery)


class UnevenShards(ToyDataModule):
    """Rank 0 evaluates samples 0..14, rank 1 samples 10..22: uneven and overlapping."""

    def test_dataloader(self) -> DataLoader:
        rank = dist.get_rank()
        rows = range(0, 15) if rank == 0 else range(10, 23)
        return DataLoader(Subset(ToyDataset(self.split), list(rows)), batch_size=self.batch_size)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )
    torch.set_num_threads(1)
    split = toy_split()
    results = {}
    for name, datamodule, padded in [("padded", ToyDataModule(split), True), ("uneven", UnevenShards(split), False)]:
        callback = RetrievalEvaluator(print_table=False)
        trainer = L.Trainer(
            accelerator="cpu", devices=WORLD, strategy="ddp", logger=False, callbacks=[callback],
            default_root_dir=out_dir, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, use_distributed_sampler=padded,
        )
        method = CheckedToyMethod(oracle=split["labels"], refine_mode="both")
        with warnings.catch_warnings(record=True) as caught:  # the filters in force stay as they are
            (logged,) = trainer.test(method, datamodule=datamodule, verbose=False)
        noise = [str(w.message) for w in caught if "sync_dist=True" in str(w.message)]
        results[name] = {"metrics": callback.last_metrics, "logged": logged, "sync_dist_warnings": noise}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_ddp_gloo_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    split = toy_split()
    single = retrieval_metrics(split["embeddings"], split["labels"], split["is_query"], split["is_gallery"],
                               recall_ks=ToyDataModule.recall_ks)
    single["NMI"] = nmi(split["embeddings"], split["labels"])
    assert single["num_gallery"] == 23 and single["num_queries"] == 16
    for name in ("padded", "uneven"):
        for rank in ranks:
            metrics = rank[name]["metrics"]
            for key, value in single.items():
                assert metrics[f"test/{key}"] == value, (name, key)  # exactly, duplicates removed
            assert metrics["test/refined/R@1"] == 1.0 and metrics["test/refined/level3/R@1"] == 0.0
            assert rank[name]["logged"] == ranks[0][name]["logged"]  # identical logs on every rank
            assert rank[name]["sync_dist_warnings"] == []  # the evaluator's metrics are already global

    record = json.loads((tmp_path / "metrics_test.json").read_text())  # written by rank 0 only
    assert len(record["evaluations"]) == 2
    assert all(e["metrics"] == single for e in record["evaluations"])
