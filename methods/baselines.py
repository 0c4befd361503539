"""Classic DML baselines on pytorch-metric-learning: Multi-Similarity, ProxyAnchor, Margin.

These are the rows the papers compare against and the first stage of Context-Refine. The
losses and miners are pytorch-metric-learning's own (well tested, widely used): this file
only wires them to the shared base.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners

from benchmark.core.contracts import register_method
from methods.base import RetrievalMethod


class PMLMethod(RetrievalMethod):
    """A pytorch-metric-learning loss (and optional miner) on the batch's embeddings."""

    def build_loss(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        raise NotImplementedError

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loss_fn, self.miner = self.build_loss()

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        emb = F.normalize(self.project(self.encode(batch["image"]).pooled), dim=-1)  # (B, D)
        labels = batch["label"]
        tuples = self.miner(emb, labels) if self.miner is not None else None
        return {"loss": self.loss_fn(emb, labels, tuples)}


@register_method("ms")
class MultiSimilarity(PMLMethod):
    """Multi-Similarity loss with its pair miner (Wang et al., CVPR 2019)."""

    description = "Multi-Similarity loss + MS miner (Wang et al. 2019)"
    min_samples_per_class = 2  # a loss on positive pairs

    def __init__(
        self, alpha: float = 2.0, beta: float = 40.0, base: float = 0.5, miner_epsilon: float = 0.1, **kwargs: Any
    ) -> None:
        self.alpha, self.beta, self.base, self.miner_epsilon = alpha, beta, base, miner_epsilon
        super().__init__(**kwargs)

    def build_loss(self):
        loss = losses.MultiSimilarityLoss(alpha=self.alpha, beta=self.beta, base=self.base)
        miner = miners.MultiSimilarityMiner(epsilon=self.miner_epsilon) if self.miner_epsilon > 0 else None
        return loss, miner


@register_method("proxy_anchor")
class ProxyAnchor(PMLMethod):
    """Proxy-Anchor loss (Kim et al., CVPR 2020); proxies train at ``proxy_lr_mult`` x lr."""

    description = "Proxy-Anchor loss (Kim et al. 2020)"

    def __init__(self, margin: float = 0.1, alpha: float = 32.0, proxy_lr_mult: float = 100.0, **kwargs: Any) -> None:
        self.margin, self.alpha, self.proxy_lr_mult = margin, alpha, proxy_lr_mult
        super().__init__(**kwargs)

    def build_loss(self):
        loss = losses.ProxyAnchorLoss(self.require_classes(), self.embedding_dim, margin=self.margin, alpha=self.alpha)
        return loss, None

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = [g for g in super().parameter_groups()]
        proxy_ids = {id(p) for p in self.loss_fn.parameters()}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in proxy_ids]
        groups = [g for g in groups if g["params"]]
        groups.append(
            {"params": list(self.loss_fn.parameters()), "lr": self.hparams.lr * self.proxy_lr_mult, "name": "proxies"}
        )
        return groups


@register_method("margin")
class Margin(PMLMethod):
    """Margin loss with distance-weighted sampling (Wu et al., ICCV 2017), learnable beta."""

    description = "Margin loss + distance-weighted miner (Wu et al. 2017)"
    min_samples_per_class = 2  # a loss on positive pairs

    def __init__(
        self,
        margin: float = 0.2,
        beta: float = 1.2,
        learn_beta: bool = True,
        class_specific_beta: bool = True,
        beta_lr_mult: float = 1.0,
        miner_cutoff: float = 0.5,
        miner_nonzero_loss_cutoff: float = 1.4,
        **kwargs: Any,
    ) -> None:
        self.margin, self.beta, self.learn_beta = margin, beta, learn_beta
        self.class_specific_beta, self.beta_lr_mult = class_specific_beta, beta_lr_mult
        self.miner_cutoff, self.miner_nonzero_loss_cutoff = miner_cutoff, miner_nonzero_loss_cutoff
        super().__init__(**kwargs)

    def build_loss(self):
        num_classes = self.require_classes() if self.learn_beta and self.class_specific_beta else None
        loss = losses.MarginLoss(margin=self.margin, beta=self.beta, learn_beta=self.learn_beta, num_classes=num_classes)
        miner = miners.DistanceWeightedMiner(cutoff=self.miner_cutoff, nonzero_loss_cutoff=self.miner_nonzero_loss_cutoff)
        return loss, miner
