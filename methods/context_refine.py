"""Context-Refine CA: cross-attention over nearest neighbours refines precomputed embeddings.

"Attend to Context for Refining Embeddings in Deep Metric Learning" (main text and
supplement in ``../shared/papers/``). Two stages, one method:

1. **Initial embeddings** ``e0``: a frozen model embeds the training split and the evaluation
   splits once. The model is a trained checkpoint of any registered method (``source``; the
   paper uses Multi-Similarity, Table 3 also Margin and ProxyAnchor) or, without ``source``,
   this module's own plain backbone (+ head). The embeddings are cached on disk, keyed by the
   model, the dataset split and the evaluation transform (:class:`EmbeddingCache`).
2. **Refinement**: every sample's context ``C`` is the ``e0`` of its ``k`` nearest neighbours
   (within the training split for training, within the evaluation gallery at test time;
   transductive, labels are never used). ``T`` cross-attention blocks update the sample's
   own embedding (Eq. 2-3)::

       e^t = normalize(e^{t-1} + CA^t(e^{t-1}, C, C)),
       CA(q, c, c) = softmax(Q(q) K(c)^T / sqrt(d)) V(c),

   with ``Q``, ``K``, ``V`` two-layer SiLU MLPs and a skip connection around ``Q``
   (supplement A); an optional final ``Linear + L2`` maps ``d1`` to ``d2`` (supplement B).
   The Multi-Similarity loss on ``e^T`` trains the blocks; the source stays frozen.

At evaluation :meth:`ContextRefine.embed` returns ``e0`` (the plain metrics are the initial
ones) and :meth:`ContextRefine.refine` returns ``e^T`` and every level ``e^1 ... e^T``, which
the evaluation callback reports next to them (``test/refined/R@1``,
``test/refined/level3/R@1``, ...).

Where the paper is silent the choices are configuration (see docs/methods/context_refine.md):
a sample is not its own neighbour (``include_self=False``: the context holds k *other*
samples, the sample itself enters through the query path and the residual), the same at
training and test time; the context is ``e0`` of the neighbours in every block (Eq. 3 keeps
``C_q`` fixed); the hidden width of the projection MLPs is ``d``; there is no output
projection after the attention (``V``'s second layer plays that role). With these choices the
default model has 8 x 6 x (512 x 512 + 512) = 12.6 M parameters at d = 512 (paper: 12 M).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from torch import nn

from benchmark.core.contracts import DataRequest, evaluation_outputs, register_method
from benchmark.core.errors import ConfigError
from benchmark.core.validation import check_choice
from benchmark.nn import fused
from benchmark.nn.attention import Attention
from benchmark.nn.backbones import BackboneConfig
from benchmark.nn.embedding_cache import (
    EmbeddingCache,
    embedding_cache_key,
    file_fingerprint,
    module_fingerprint,
)
from benchmark.nn.knn_context import KnnBackend, knn_search, mean_context
from benchmark.nn.mlp import ProjectionMLP
from methods.base import OptimizerName, RetrievalMethod, embed_output_dim, load_frozen_method

Aggregation = Literal["attention", "mean"]
InferenceDtype = Literal["float32", "bfloat16"]


# ---------------------------------------------------------------------------- the refiner
class ContextAttentionBlock(nn.Module):
    """``CA(q, c, c) = softmax(Q(q) K(c)^T / sqrt(d_h)) V(c)`` for one query per context (Eq. 2).

    ``Q`` (with a skip connection, supplement A), ``K`` and ``V`` are :class:`ProjectionMLP`;
    with several heads the projections are split into ``num_heads`` slices of ``d / h``; the
    attention itself is :class:`benchmark.nn.Attention`.
    """

    def __init__(self, dim: int, hidden_dim: int, num_heads: int = 1, query_skip: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"num_heads={num_heads} must be a positive divisor of the embedding size {dim}.")
        self.query = ProjectionMLP(dim, hidden_dim, skip=query_skip)
        self.key = ProjectionMLP(dim, hidden_dim)
        self.value = ProjectionMLP(dim, hidden_dim)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attention = Attention(num_heads, scale=self.scale)  # no parameters

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., D) context embeddings -> their keys and values, each (..., D)."""
        return self.key(context), self.value(context)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, D) query embeddings, (B, k, D) projected keys and values -> (B, D) update."""
        out, _ = self.attention(self.query(query)[:, None], keys, values)  # (B, 1, D) over (B, k, D)
        return out[:, 0]

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, D) query, (B, k, D) context -> (B, D) residual update."""
        keys, values = self.project_context(context)
        return self.attend(query, keys, values)


class ContextRefiner(nn.Module):
    """``T`` cross-attention blocks with residuals and L2 normalisation (Eq. 3), + optional d1 -> d2.

    :meth:`forward` refines a batch whose contexts are given explicitly (training).
    :meth:`refine_set` refines a whole set whose contexts are rows of a shared bank: the keys
    and values of every bank row are computed once per block and gathered, instead of once
    per (sample, neighbour) pair, which is k times less work and gives the same result.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int = 8,
        hidden_dim: int | None = None,
        num_heads: int = 1,
        query_skip: bool = True,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ConfigError(
                f"--model.refiner.num_blocks must be >= 1 (got {num_blocks}); use --model.refiner.aggregation mean for no blocks."
            )
        self.dim = dim
        self.blocks = nn.ModuleList(
            ContextAttentionBlock(dim, hidden_dim or dim, num_heads, query_skip) for _ in range(num_blocks)
        )
        self.output = nn.Linear(dim, output_dim) if output_dim else None

    def finish(self, e: torch.Tensor) -> torch.Tensor:
        """(B, d1) last level -> (B, d2) output embedding (identity without ``output_dim``)."""
        return F.normalize(self.output(e), dim=-1) if self.output is not None else e

    def forward(self, e0: torch.Tensor, context: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, D) initial embeddings, (B, k, D) contexts -> ([e^1, ..., e^T], output)."""
        e, levels = e0, []
        for block in self.blocks:
            e = F.normalize(e + block(e, context), dim=-1)  # (B, D), Eq. 3 + normalisation
            levels.append(e)
        return levels, self.finish(e)

    @torch.no_grad()
    def refine_set(
        self,
        e0: torch.Tensor,
        bank: torch.Tensor,
        neighbours: torch.Tensor,
        self_context: bool = False,
        chunk_size: int = 4096,
        dtype: torch.dtype | None = None,
        fast: bool | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Refine every row of ``e0`` with the bank rows listed in ``neighbours`` as context.

        Args:
            e0: (Q, D) initial embeddings of the samples to refine.
            bank: (M, D) initial embeddings the contexts are drawn from.
            neighbours: (Q, k) bank rows forming each sample's context (distinct per row).
            self_context: prepend the sample's own ``e0`` to its context.
            chunk_size: samples per gathered (c, k, D) block (gather path).
            dtype: compute dtype of the projections (``torch.bfloat16`` or ``None`` = float32).
            fast: use the CPU sparse path (:meth:`_refine_set_sparse`); ``None`` decides: on
                CPU with one head and no self context.

        Returns:
            ([e^1, ..., e^T] each (Q, D) float32, (Q, D') float32 output).
        """
        dtype = dtype or torch.float32
        if fast is None:
            fast = e0.device.type == "cpu" and not self_context and self.blocks[0].num_heads == 1
        if fast:
            return self._refine_set_sparse(e0, bank, neighbours, dtype)
        e = e0.float()
        levels = []
        with torch.autocast(e0.device.type, dtype=dtype, enabled=dtype != torch.float32):
            for block in self.blocks:
                bank_keys, bank_values = block.project_context(bank)  # (M, D) each, once per row
                if self_context:
                    own_keys, own_values = block.project_context(e0)  # (Q, D)
                new = torch.empty_like(e)
                for a in range(0, e.shape[0], chunk_size):
                    b = min(a + chunk_size, e.shape[0])
                    idx = neighbours[a:b]  # (c, k)
                    keys, values = bank_keys[idx], bank_values[idx]  # (c, k, D)
                    if self_context:
                        keys = torch.cat([own_keys[a:b, None], keys], dim=1)  # (c, 1 + k, D)
                        values = torch.cat([own_values[a:b, None], values], dim=1)
                    update = block.attend(e[a:b], keys, values).float()  # (c, D)
                    new[a:b] = F.normalize(e[a:b] + update, dim=-1)
                e = new
                levels.append(e)
            out = self.finish(e).float()
        return levels, out

    def _refine_set_sparse(
        self, e0: torch.Tensor, bank: torch.Tensor, neighbours: torch.Tensor, dtype: torch.dtype
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The CPU evaluation path: the same function as the gather path, far less memory traffic.

        * no (Q, k, D) gathered copy is ever written: the scores are a sampled matrix product
          (SDDMM) over the sparse neighbour pattern, and the attention-weighted sum is one
          ``embedding_bag`` (a fused gather + weighted sum);
        * ``V``'s second layer is linear and the weights sum to one, so it is applied after the
          weighted sum, ``sum_j a_j (W h_j + b) = W (sum_j a_j h_j) + b``, with the residual
          ``e + ...`` fused into that product;
        * bias, SiLU and residual additions are fused into the matrix products (oneDNN
          post-ops) when PyTorch has them; ``dtype=torch.bfloat16`` runs the products in
          bfloat16 (AMX / AVX512-BF16 CPUs), the scores and the normalisation in float32;
        * rows go through each block in chunks of ``CPU_CHUNK``, so that a chunk's
          intermediates stay in the CPU cache between one operation and the next.
        """
        num_q, k = neighbours.shape
        num_m = bank.shape[0]
        if k == 0:
            raise ValueError("refine_set: empty contexts (k = 0); pass self_context=True or some neighbours.")
        cols = neighbours.sort(dim=1).values  # (Q, k): attention is order-invariant; CSR wants sorted
        if k > 1 and bool((cols[:, 1:] == cols[:, :-1]).any()):
            raise ValueError("refine_set: a neighbour list contains the same bank row twice.")
        step = CPU_CHUNK
        crow = torch.arange(0, step * k + 1, k, device=e0.device)  # (c + 1,) rows of a chunk's pattern
        bank_c = bank.to(dtype)
        e = e0.float()
        levels = []
        for block in self.blocks:
            q, key, value = [
                (m.fc1.weight.to(dtype), m.fc1.bias.to(dtype), m.fc2.weight.to(dtype), m.fc2.bias.to(dtype))
                for m in (block.query, block.key, block.value)
            ]
            hidden = value[0].shape[0]
            keys = torch.empty(num_m, self.dim, device=e0.device)  # (M, D) float32 for the SDDMM
            h_v = torch.empty(num_m, hidden, device=e0.device, dtype=dtype)  # (M, H) V's hidden layer
            for a in range(0, num_m, step):
                rows = bank_c[a : a + step]
                keys[a : a + step] = fused.linear(fused.linear(rows, *key[:2], silu=True), *key[2:])
                h_v[a : a + step] = fused.linear(rows, *value[:2], silu=True)
            new = torch.empty_like(e)
            for a in range(0, num_q, step):
                c = min(step, num_q - a)
                e_c = e[a : a + c].to(dtype)  # (c, D)
                h_q = fused.linear(e_c, *q[:2], silu=True)  # (c, H)
                query = fused.linear(h_q, *q[2:], add=e_c if block.query.skip else None).float()  # (c, D)
                pattern = fused.csr_pattern(
                    crow[: c + 1], cols[a : a + c].reshape(-1), query.new_zeros(c * k), (c, num_m)
                )
                # (c, D) @ (D, M), computed at the k neighbour entries of each row only:
                scores = torch.sparse.sampled_addmm(pattern, query, keys.T, beta=0.0, alpha=block.scale)
                weights = scores.values().view(c, k).softmax(dim=-1)  # (c, k)
                mixed = F.embedding_bag(
                    cols[a : a + c], h_v, per_sample_weights=weights.to(dtype), mode="sum"
                )
                updated = fused.linear(
                    mixed, *value[2:], add=e_c
                ).float()  # (c, H) -> (c, D): e + CA(e, C, C)
                new[a : a + c] = F.normalize(updated, dim=-1)  # Eq. 3
            e = new
            levels.append(e)
        return levels, self.finish(e).float()


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class RefinerConfig:
    """What refines: ``T`` cross-attention blocks over each sample's ``k`` nearest neighbours.

    Args:
        num_blocks: T, cross-attention blocks (= refinement levels).
        num_neighbours: k, neighbours in each context (0 with ``include_self``: the query
            attends only to itself, Table 4's 'CA' ablation).
        num_heads: attention heads (the paper: 1, as in Perceiver).
        hidden_dim: width of the SiLU projection MLPs (default: the embedding size).
        query_skip: skip connection around the query projection (supplement A).
        include_self: put the sample's own ``e0`` into its context (in addition to the k
            neighbours). Off by default: a sample is never its own neighbour, at training
            and at test time alike (excluded by index).
        aggregation: ``attention`` (the method) or ``mean`` (Table 4's 'NNs' ablation: the
            mean of the sample and its k neighbours, no parameters, nothing to train).
        output_dim: d2 of an optional final Linear + L2 normalisation (supplement B).
    """

    num_blocks: int = 8
    num_neighbours: int = 8
    num_heads: int = 1
    hidden_dim: int | None = None
    query_skip: bool = True
    include_self: bool = False
    aggregation: Aggregation = "attention"
    output_dim: int | None = None

    def __post_init__(self) -> None:
        check_choice("--model.refiner.aggregation", self.aggregation, Aggregation)
        if self.num_neighbours < 0:
            raise ConfigError(f"--model.refiner.num_neighbours must be >= 0, got {self.num_neighbours}.")
        if self.num_neighbours == 0 and not self.include_self:
            raise ConfigError(
                "--model.refiner.num_neighbours 0 without include_self leaves every context empty; set "
                "--model.refiner.include_self true (the paper's 'CA without neighbours' ablation: the query "
                "attends to itself)."
            )
        if self.aggregation == "attention" and self.num_blocks < 1:
            raise ConfigError(
                f"--model.refiner.num_blocks must be >= 1 (got {self.num_blocks}); use aggregation 'mean' for no blocks."
            )


@dataclass(frozen=True)
class MSLossConfig:
    """The Multi-Similarity loss on the refined embedding ``e^T`` (Eq. 4).

    Args:
        alpha: weight of the positive pairs (the paper: 2).
        beta: weight of the negative pairs (the paper: 40).
        base: similarity margin lambda (the paper: 0.5).
        miner_epsilon: MS miner margin; 0 (default) uses every pair, as Eq. 4 does.
    """

    alpha: float = 2.0
    beta: float = 40.0
    base: float = 0.5
    miner_epsilon: float = 0.0


@dataclass(frozen=True)
class InferenceConfig:
    """How the initial embeddings are found and refined outside training (no effect on the weights).

    Args:
        knn_backend: neighbour search: ``auto`` (= ``torch``, exact, on the data's device) or ``faiss``.
        cache: keep the initial embeddings on disk (``$DML_BENCHMARK_DATA/embedding_cache``).
        cache_dir: another folder for the cache.
        report_levels: also return every level ``e^1 ... e^T`` from :meth:`ContextRefine.refine`
            (paper Fig. 3), except in the validations during ``fit`` (only ``e^T`` there: cheaper).
        chunk_size: samples per gathered context block at test time.
        dtype: compute dtype of the refinement (``bfloat16`` is faster on CPUs/GPUs with native
            bfloat16; training is unaffected).
    """

    knn_backend: KnnBackend = "auto"
    cache: bool = True
    cache_dir: str | None = None
    report_levels: bool = True
    chunk_size: int = 4096
    dtype: InferenceDtype = "float32"

    def __post_init__(self) -> None:
        check_choice("--model.inference.knn_backend", self.knn_backend, KnnBackend)
        check_choice("--model.inference.dtype", self.dtype, InferenceDtype)
        if self.chunk_size < 1:
            raise ConfigError(f"--model.inference.chunk_size must be >= 1, got {self.chunk_size}.")


# ---------------------------------------------------------------------------- the method
@register_method("context_refine")
class ContextRefine(RetrievalMethod):
    """Refines frozen embeddings with cross-attention over each sample's k nearest neighbours.

    Args:
        source: checkpoint of any registered method (e.g. ``ms``) whose embeddings are
            refined; ``None`` refines this module's own frozen backbone (+ head).
        refiner: the refinement architecture (:class:`RefinerConfig`: T blocks, k neighbours,
            heads, aggregation); ``--model.refiner.num_blocks 4``.
        loss: the Multi-Similarity loss on ``e^T`` (:class:`MSLossConfig`).
        inference: neighbour search, embedding cache and refinement at evaluation
            (:class:`InferenceConfig`).
        backbone, embedding_dim: the plain model used without ``source`` (ignored with one).
        optimizer, lr, weight_decay: Adam, 1e-4, none (supplement A); no schedule.
        **kwargs: the rest of :class:`RetrievalMethod` (``num_classes``, ``image_size``, ...).
    """

    description = "Context-Refine CA: cross-attention over k-NN context refines frozen embeddings"
    # The frozen initial embeddings never change: the method is judged by its refined output.
    selection_metric = "val/refined/R@1"
    # The stage-1 checkpoint's path differs per seed in a suite ({output}/ms-...-seed{seed}); the runs
    # are compared by what it is (describe(): source_method) not by where it lies.
    per_run_options = ("source",)
    min_samples_per_class = 2  # the multi-similarity loss on refined embeddings needs positive pairs

    def __init__(
        self,
        source: str | None = None,
        refiner: RefinerConfig = RefinerConfig(),
        loss: MSLossConfig = MSLossConfig(),
        inference: InferenceConfig = InferenceConfig(),
        backbone: BackboneConfig | None = None,
        embedding_dim: int | None = None,
        optimizer: OptimizerName = "adam",
        optimizer_args: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        source_model = load_source(source) if source else None
        stage1_backbone = (
            replace(source_model.backbone_config, pretrained=False, weights=None)
            if source_model is not None
            else backbone
        )
        super().__init__(
            backbone=stage1_backbone,
            embedding_dim=embedding_dim,
            optimizer=optimizer,
            optimizer_args=optimizer_args,
            lr=lr,
            weight_decay=weight_decay,
            **kwargs,
        )
        self.source = source
        if source_model is not None:
            # The base built an encoder for the source's architecture; use the source's own.
            self.source_model = source_model
            self.encoder, self.head = source_model.encoder, source_model.head
            self.backbone_config = source_model.backbone_config
            self.embedding_dim = embed_output_dim(source_model)
        else:
            self.source_model = None
        self.encoder.requires_grad_(False)
        self.head.requires_grad_(False)

        self.num_neighbours, self.include_self = refiner.num_neighbours, refiner.include_self
        self.aggregation = refiner.aggregation
        self.knn_backend, self.report_levels = inference.knn_backend, inference.report_levels
        self.refine_chunk_size = inference.chunk_size
        self.inference_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[inference.dtype]
        self.refiner = (
            ContextRefiner(
                self.embedding_dim,
                refiner.num_blocks,
                refiner.hidden_dim,
                refiner.num_heads,
                refiner.query_skip,
                refiner.output_dim,
            )
            if refiner.aggregation == "attention"
            else None
        )
        self.loss_fn = losses.MultiSimilarityLoss(alpha=loss.alpha, beta=loss.beta, base=loss.base)
        self.miner = (
            miners.MultiSimilarityMiner(epsilon=loss.miner_epsilon) if loss.miner_epsilon > 0 else None
        )
        self.embedding_cache = EmbeddingCache(inference.cache_dir) if inference.cache else None
        # Stage-1 state (not part of the checkpoint): the training bank and evaluation e0.
        self._train_e0: torch.Tensor | None = None
        self._train_nn: torch.Tensor | None = None
        self._eval_e0: dict[str, torch.Tensor] = {}
        self._memo: dict[str, torch.Tensor] = {}  # e0 by cache key, for this process
        self._eval_neighbours: tuple[Any, torch.Tensor] | None = None
        self._source_id: dict[str, Any] | str | None = None

    # ------------------------------------------------------------------ stage 1
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, D) initial embeddings e0 of the frozen stage-1 model."""
        if self.source_model is not None:
            return F.normalize(self.source_model.embed(images).float(), dim=-1)
        return super().embed(images)

    def train(self, mode: bool = True) -> ContextRefine:
        """Train the refiner; the stage-1 model stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.encoder.eval()
        self.head.eval()
        if self.source_model is not None:
            self.source_model.eval()
        return self

    def data_request(self) -> DataRequest:
        """Training batches carry labels and dataset indices only: e0 comes from the cache."""
        return DataRequest(normalization=self.encoder.normalization, load_images=False,
                           min_samples_per_class=self.min_samples_per_class)

    def source_id(self) -> dict[str, Any] | str:
        """What identifies the stage-1 model in cache keys (file identity, or a content hash)."""
        if self._source_id is None:
            if self.source:
                self._source_id = {"checkpoint": file_fingerprint(self.source)}
            else:
                self._source_id = {
                    "plain": self.backbone_config.name,
                    "state": module_fingerprint(nn.ModuleList([self.encoder, self.head])),
                }
        return self._source_id

    def cache_key(self, datamodule: Any, split: str) -> str:
        """Cache key of ``split`` (``train``, ``val``, ``test``) of ``datamodule``, as embedded now."""
        records = getattr(datamodule, f"{split}_records")
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        return embedding_cache_key(
            self.source_id(),
            getattr(datamodule, "name", type(datamodule).__name__),
            str(getattr(datamodule, "root", "")),
            records.paths,
            repr(datamodule.eval_transform()),
            precision,
        )

    def split_embeddings(self, datamodule: Any, split: str) -> torch.Tensor:
        """(N, D) e0 of every sample of ``split`` in dataset-index order: cached, or embedded once."""
        records = getattr(datamodule, f"{split}_records")
        # The eval transform (part of the key) uses the stage-1 model's input normalisation; the
        # trainer applies the request in setup(), a caller without a trainer needs it here.
        datamodule.apply_request(self.data_request())
        key = self.cache_key(datamodule, split)
        if key in self._memo:
            return self._memo[key]
        cache = self.embedding_cache
        emb = cache.load(key, len(records), self.embedding_dim) if cache is not None else None
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # every rank must embed, or none
            if not trainer.strategy.reduce_boolean_decision(emb is not None, all=True):
                emb = None
        if emb is None:
            emb = self.embed_loader(datamodule.eval_dataloader(records), desc=f"source_{split}")
            if cache is not None and (trainer is None or trainer.is_global_zero):
                meta = {
                    "split": split,
                    "dataset": getattr(datamodule, "name", ""),
                    "source": self.source_id(),
                }
                cache.save(key, emb, meta)
            if trainer is not None and trainer.world_size > 1:
                trainer.strategy.barrier("context_refine_cache")
        self._memo[key] = F.normalize(emb.to(self.device, torch.float32), dim=-1)
        return self._memo[key]

    def set_training_bank(self, embeddings: torch.Tensor) -> None:
        """Use (N, D) training-split e0 (dataset-index order) and find each row's neighbours."""
        e0 = F.normalize(embeddings.to(self.device, torch.float32), dim=-1)
        rows = torch.arange(e0.shape[0], device=e0.device)
        self._train_nn = knn_search(
            e0, e0, self.num_neighbours, exclude=rows, backend=self.knn_backend
        )  # (N, k)
        self._train_e0 = e0

    def _datamodule(self) -> Any | None:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def on_train_start(self) -> None:
        """Stage 1 for training: e0 of the training split and its neighbour lists."""
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, "train_records"):
            if self._train_e0 is not None:  # set by hand with set_training_bank
                return
            raise RuntimeError(
                "context_refine trains on cached embeddings of the training split and needs a retrieval "
                "datamodule (trainer.fit(model, datamodule=...)), or call set_training_bank(e0) first."
            )
        self.set_training_bank(self.split_embeddings(datamodule, "train"))

    def _prepare_eval(self, split: str) -> None:
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, f"{split}_records"):
            self._eval_e0.pop(split, None)
            return
        self._eval_e0[split] = self.split_embeddings(datamodule, split)  # memoised by cache key

    def on_validation_start(self) -> None:
        self._prepare_eval("val")

    def on_test_start(self) -> None:
        self._prepare_eval("test")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Loaded weights may change a plain backbone: forget fingerprints and cached e0."""
        super().on_load_checkpoint(checkpoint)
        self._source_id, self._eval_e0, self._memo, self._train_e0, self._train_nn = None, {}, {}, None, None

    def _split_step(self, batch: dict[str, Any], split: str) -> dict[str, torch.Tensor]:
        cached = self._eval_e0.get(split)
        if cached is None:
            return self._eval_step(batch)
        return evaluation_outputs(cached[batch["index"].to(cached.device)], batch)  # (b, D) cached e0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._split_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._split_step(batch, "test")

    # ------------------------------------------------------------------ stage 2
    def gather_context(self, e0: torch.Tensor, bank: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """(B, D) e0, (M, D) bank, (B, k) bank rows -> (B, k [+1], D) contexts (self first if included)."""
        context = bank[neighbours]  # (B, k, D)
        if self.include_self and self.aggregation == "attention":
            context = torch.cat([e0[:, None], context], dim=1)  # (B, 1 + k, D)
        return context

    def refine_batch(
        self, e0: torch.Tensor, context: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, D) e0 and (B, k', D) contexts -> ([e^1, ..., e^T], output embedding)."""
        if self.refiner is None:
            return [], mean_context(e0, context)
        return self.refiner(e0, context)

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self._train_e0 is None or self._train_nn is None:
            raise RuntimeError(
                "context_refine has no training bank: it is built in on_train_start from the datamodule's "
                "training split; call set_training_bank(e0) when driving training_loss by hand."
            )
        index = batch["index"].to(self._train_e0.device).long()  # (B,)
        e0 = self._train_e0[index]  # (B, D)
        context = self.gather_context(e0, self._train_e0, self._train_nn[index])  # (B, k', D)
        _, out = self.refine_batch(e0, context)
        labels = batch["label"].to(out.device)
        tuples = self.miner(out, labels) if self.miner is not None else None
        return {"loss": self.loss_fn(out, labels, tuples)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.refiner is None:  # 'mean' has nothing to train: log the loss, skip the step
            with torch.no_grad():
                self.log("train/loss", self.training_loss(batch)["loss"], batch_size=len(batch["label"]))
            return None
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        if self.refiner is None:
            return None
        return super().configure_optimizers()

    @torch.no_grad()
    def refine(
        self, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Transductive refinement of an evaluation set (no labels).

        Every sample (query or gallery) takes its k nearest *gallery* samples as context
        (itself excluded by index), then goes through the blocks. Returns ``{"": output}`` and,
        with ``report_levels``, ``{"level1": e^1, ..., "levelT": e^T}``, all (N, D') in the
        order of ``embeddings``.
        """
        device = self.device
        e0 = F.normalize(embeddings.to(device, torch.float32), dim=-1)  # (N, D)
        gallery = torch.as_tensor(is_gallery, device=device).bool().nonzero().flatten()  # (G,)
        bank = e0[gallery]  # (G, D)
        neighbours = self.evaluation_neighbours(e0, gallery)  # (N, k) rows of bank
        chunk = self.refine_chunk_size
        if self.refiner is None:
            parts = [
                mean_context(e0[a : a + chunk], bank[neighbours[a : a + chunk]])
                for a in range(0, len(e0), chunk)
            ]
            return {"": torch.cat(parts)}
        levels, out = self.refiner.refine_set(
            e0, bank, neighbours, self.include_self, chunk, self.inference_dtype
        )
        result = {"": out}
        if self.report_levels and not self._fitting():
            result.update({f"level{t + 1}": level for t, level in enumerate(levels)})
        return result

    def evaluation_neighbours(self, e0: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """(N, k) nearest gallery rows of every sample, itself excluded by index.

        The evaluated e0 is the same at every validation (the stage-1 model is frozen), so the
        last result is kept, keyed by a hash of the embeddings and the gallery.
        """
        digest = hashlib.sha1(e0.detach().cpu().numpy().tobytes())
        digest.update(gallery.cpu().numpy().tobytes())
        key = (digest.hexdigest(), self.num_neighbours, self.knn_backend)
        if self._eval_neighbours is not None and self._eval_neighbours[0] == key:
            return self._eval_neighbours[1].to(e0.device)
        column = torch.full((e0.shape[0],), -1, dtype=torch.long, device=e0.device)
        column[gallery] = torch.arange(gallery.numel(), device=e0.device)  # own bank row, -1 if none
        neighbours = knn_search(
            e0, e0[gallery], self.num_neighbours, exclude=column, backend=self.knn_backend
        )
        self._eval_neighbours = (key, neighbours)
        return neighbours

    def _fitting(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.state.fn == "fit"

    def on_test_end(self) -> None:
        """Print Recall@1 of e0, every level and the output on one line (paper Fig. 3)."""
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        key = "R@1"
        curve = [("e0", metrics.get(f"test/{key}"))]
        curve += (
            [
                (f"e{t}", metrics.get(f"test/refined/level{t}/{key}"))
                for t in range(1, len(self.refiner.blocks) + 1)
            ]
            if self.refiner is not None
            else []
        )
        curve.append(("output", metrics.get(f"test/refined/{key}")))
        shown = [f"{name} {100 * float(value):.2f}" for name, value in curve if value is not None]
        if len(shown) > 1:
            print(f"context_refine test {key} by level: " + " | ".join(shown))

    # ------------------------------------------------------------------ bookkeeping
    def num_refiner_parameters(self) -> int:
        """Trainable parameters of stage 2 (the paper: 12 M for 8 blocks at d = 512)."""
        return sum(p.numel() for p in self.refiner.parameters()) if self.refiner is not None else 0

    @classmethod
    def reference_names(cls, meta: Mapping[str, Any], refined: bool) -> list[str]:
        """The paper lists the refined numbers by stage-1 method (``context_refine(ms)``: its model of
        8 blocks over 8 neighbours, Sec. 4.5), Table 4's ablations by what they leave out
        (``context_refine(ms, no neighbours)``: the blocks attend to the query alone;
        ``context_refine(ms, neighbour mean)``: the neighbours averaged, no cross-attention), and the
        initial embeddings as the stage-1 method's baseline (``ms_baseline``). Other architectures
        (the blocks x neighbours grid of the supplement's Fig. 1) have no number in a table."""
        source = meta.get("source_method")
        if not source:
            return []
        if not refined:
            return [f"{source}_baseline"]
        blocks, neighbours = meta.get("num_blocks", 8), meta.get("num_neighbours", 8)
        if meta.get("aggregation", "attention") == "mean":
            return [f"context_refine({source}, neighbour mean)"] if neighbours == 8 else []
        if neighbours == 0 and meta.get("include_self") and blocks == 8:
            return [f"context_refine({source}, no neighbours)"]
        if blocks == 8 and neighbours == 8 and not meta.get("include_self"):
            return [f"context_refine({source})"]
        return []

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": self.source,
            "source_method": getattr(self.source_model, "method_name", None)
            if self.source_model is not None
            else None,
            "num_blocks": len(self.refiner.blocks) if self.refiner is not None else 0,
            "num_neighbours": self.num_neighbours,
            "include_self": self.include_self,
            "aggregation": self.aggregation,
            "refiner_parameters": self.num_refiner_parameters(),
        }

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One group: the refiner (the stage-1 model is frozen)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.hparams.lr, "name": "refiner"}]


# ---------------------------------------------------------------------------- helpers
CPU_CHUNK = 4096  # rows per step of the CPU set path (measured best of 1k-16k on 1 and 2 threads)


def load_source(path: str) -> RetrievalMethod:
    """Rebuild the frozen stage-1 model from a checkpoint of any registered method
    (:func:`methods.base.load_frozen_method`: no pretrained download, frozen, eval mode)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"Context-Refine source checkpoint {file} does not exist. Pass --model.source with a checkpoint "
            "of a trained method (e.g. runs/<ms run>/checkpoints/last.ckpt), or leave it null to refine the "
            "plain backbone's embeddings."
        )
    checkpoint = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    if checkpoint.get("method_name") == "context_refine":
        raise ValueError(
            f"{file} is a context_refine checkpoint; the source must be a stage-1 model (e.g. ms)."
        )
    return load_frozen_method(file, checkpoint)
