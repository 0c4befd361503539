"""A tiny method and datamodule with fixed embeddings, for driving the evaluation callback.

The "method" returns each sample's stored embedding times a parameter equal to 1, so the
embeddings reaching the callback are exactly known, whatever the batching or the rank.
Its ``refine`` step is known too: ``""`` returns one-hot vectors of an oracle grouping (the
true classes, which the toy knows from its construction, not from the labels it never
receives), so refined retrieval is perfect; ``"level3"`` returns ranked lists with every
negative before every positive.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from benchmark.core.contracts import RankedLists, evaluation_outputs


def toy_split(n: int = 23, dim: int = 6, num_classes: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Clustered embeddings with some exact duplicates; every third sample is gallery only."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    centers = torch.randn(num_classes, dim, generator=g)
    emb = centers[labels] + 0.9 * torch.randn(n, dim, generator=g)
    emb[5] = emb[0]  # duplicates across classes and within a class
    emb[11] = emb[1]
    is_query = torch.arange(n) % 3 != 2
    is_gallery = torch.ones(n, dtype=torch.bool)
    return {"embeddings": emb, "labels": labels, "is_query": is_query, "is_gallery": is_gallery}


class ToyDataset(Dataset):
    def __init__(self, split: dict[str, torch.Tensor]) -> None:
        self.split = split

    def __len__(self) -> int:
        return self.split["labels"].numel()

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.split
        return {
            "x": s["embeddings"][i],
            "label": s["labels"][i],
            "index": i,
            "is_query": s["is_query"][i],
            "is_gallery": s["is_gallery"][i],
        }


class ToyDataModule(L.LightningDataModule):
    recall_ks = (1, 2, 4)
    compute_nmi = True

    def __init__(self, split: dict[str, torch.Tensor], batch_size: int = 4) -> None:
        super().__init__()
        self.split = split
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(ToyDataset(self.split), batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def describe(self) -> dict[str, Any]:
        return {"dataset": "toy", "protocol": "unit-test", "num_test_images": len(self.split["labels"])}


class ToyMethod(L.LightningModule):
    """Embeddings = stored features x 1; an optional refine step with known output."""

    def __init__(self, oracle: torch.Tensor | None = None, refine_mode: str = "none") -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.oracle = oracle
        self.refine_mode = refine_mode
        self.refine_calls: list[int] = []

    def _eval_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return evaluation_outputs(batch["x"] * self.scale, batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return (self.scale - 1.0) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def describe(self) -> dict[str, Any]:
        return {"method": "toy", "backbone": "identity"}

    def refine(self, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor) -> dict[str, Any] | None:
        self.refine_calls.append(int(embeddings.shape[0]))
        if self.refine_mode == "none":
            return None
        assert not torch.is_grad_enabled() and not self.training
        out: dict[str, Any] = {"": torch.nn.functional.one_hot(self.oracle).float()}
        if self.refine_mode == "both":
            out["level3"] = negatives_first_lists(self.oracle, is_query, is_gallery)
        return out


def negatives_first_lists(groups: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor) -> RankedLists:
    """For each query: every other gallery sample, negatives first, each part by index."""
    rows = []
    gallery = is_gallery.nonzero().flatten().tolist()
    for q in is_query.nonzero().flatten().tolist():
        others = [g for g in gallery if g != q]
        neg = [g for g in others if groups[g] != groups[q]]
        pos = [g for g in others if groups[g] == groups[q]]
        rows.append(neg + pos)
    k = max(len(r) for r in rows)
    return RankedLists(torch.tensor([r + [-1] * (k - len(r)) for r in rows], dtype=torch.int64))
