"""Intra-Batch MPN: message passing over the whole mini-batch (Seidenschwarz et al., ICML 2021).

"Learning Intra-Batch Connections for Deep Metric Learning". Every training batch (n classes
x m samples) is a fully connected graph whose nodes are the L2-normalised embeddings. A
message passing network (MPN) of ``L`` steps refines them: each step is multi-head
dot-product attention over all nodes of the batch (Eq. 1-4), residual + LayerNorm (Eq. 5), a
two-layer feed-forward block, residual + LayerNorm (Eq. 6)::

    f       = Linear(pool(backbone(x)))                         backbone embedding (unnormalised)
    h^0     = W_in f / |f|                                      input Linear (mpn.input_projection)
    a^m_ij  = softmax_j((W^m_q h_i) . (W^m_k h_j) / sqrt(d/M))  Eq. 3, M = mpn.heads of d/M dims
    m_i     = W_o cat_m(sum_j a^m_ij W^m_v h_j)                 Eq. 2 + 4
    g_i     = LN(h_i + drop(m_i))                               Eq. 5
    h_i'    = LN(g_i + drop(FF(g_i)))                           Eq. 6, FF = Linear -> ReLU -> Linear

Two classifiers, both trained with label-smoothing cross-entropy on temperature-scaled logits:

* on the backbone embedding (the *auxiliary* loss; the unnormalised 512-d vector), and
* on the MPN output (BatchNorm -> bias-free Linear; the last step's output, or every step's
  concatenated with ``mpn.classifier_input: concat``);

``loss = loss.backbone_weight * CE(W_b f / T) + loss.mpn_weight * CE(W_m BN(h^L) / T)`` with
``T = loss.temperature`` and label smoothing ``loss.label_smoothing``.

Retrieval uses the backbone embeddings (the paper's main tables). :meth:`IntraBatchMPN.refine`
additionally runs the trained MPN at test time on a *reciprocal k-NN batch* built around every
evaluated sample (Supp. C.3, :func:`benchmark.nn.reciprocal_neighbours.reciprocal_knn_batches`)
and keeps the sample's own output;
the evaluation callback reports it as ``test/refined/...``.

The batch construction (in :mod:`benchmark.nn.reciprocal_neighbours`, a building block of its
own) works from a top-k neighbour graph (``knn_graph``: chunked matrix products, no N x N matrix
and no full sort), is vectorised over all samples, and the MPN runs
on thousands of batches at once, so it reaches Stanford Online Products (60,502 test images)
on a CPU (``python -m benchmark perf reciprocal``). See docs/methods/intra_batch.md for the
equations, the recipes and the choices made where the paper is silent.

The file reads top-down: the MPN modules, the option groups of the method
(:class:`MPNConfig`, :class:`LossConfig`, :class:`ReciprocalConfig`), then the LightningModule.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.core.contracts import DEFAULT_MEMORY_BUDGET, register_method
from benchmark.core.errors import ConfigError
from benchmark.core.validation import check_all, check_choice
from benchmark.nn.attention import Attention
from benchmark.nn.backbones import BACKBONES, BackboneConfig, Pool
from benchmark.nn.reciprocal_neighbours import reciprocal_knn_batches
from methods.base import OptimizerName, RetrievalMethod, SchedulerName

ClassifierInput = Literal["last", "concat"]
RefineStages = Literal["test", "val_and_test", "never"]


# Datasets whose published "Ours" numbers the public code trained with the backbone's cross-entropy
# alone (its SOP config: ``fns: lsce``, no MPN loss), so that a run of that setting is the paper's row.
CROSS_ENTROPY_ONLY_AS_PUBLISHED = frozenset({"sop"})


# ============================================================================ message passing
class MessagePassingLayer(nn.Module):
    """One message-passing step over fully connected batches (paper Eq. 1-6, post-LN).

    ``h' = LN(h + drop(W_o cat_m(sum_j a^m_ij W^m_v h_j)))``, ``a^m_i = softmax_j(q^m_i . k^m_j /
    sqrt(d/M))`` with ``q^m_i = W^m_q h_i``, ``k^m_j = W^m_k h_j``; then
    ``out = LN(h' + drop(FF(h')))`` with ``FF = Linear -> ReLU -> Linear``.

    Args:
        dim: node feature size ``d`` (divisible by ``heads``).
        heads: attention heads ``M``; each works on ``d / M`` dimensions.
        ff_dim: hidden size of the feed-forward block.
        dropout: dropout on the attention and feed-forward outputs (before each residual).
        null_logit: add an implicit zero logit to every softmax, ``exp(s_ij) / (1 + sum_j
            exp(s_ij))`` (the public code's attention); ``False`` is the paper's plain softmax.
        attention_dropout: dropout on the attention weights (the public code: 0.1).
        ff_dropout: dropout between the feed-forward block's two Linears (the public code: 0.1).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ff_dim: int,
        dropout: float = 0.1,
        null_logit: bool = False,
        attention_dropout: float = 0.0,
        ff_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(
                f"The MPN's feature size {dim} is not divisible by heads={heads} (--model.mpn.heads); "
                "choose a number of heads that divides the embedding size (--model.embedding_dim)."
            )
        self.dim, self.heads, self.head_dim, self.null_logit = dim, heads, dim // heads, null_logit
        # no parameters: the state_dict is unchanged
        self.attention = Attention(heads, zero_logit=null_logit, dropout=attention_dropout)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(inplace=True), nn.Linear(ff_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        # Inside FF, between ReLU and the second Linear; kept outside ``ff`` so its state_dict
        # names (ff.0, ff.2) stay those of the reference mapping.
        self.ff_dropout = nn.Dropout(ff_dropout)

    def forward(self, h: torch.Tensor, num_receivers: int | None = None) -> torch.Tensor:
        """Update the nodes of every batch.

        Args:
            h: (..., B, d) node features; the last two dims are one fully connected batch.
            num_receivers: update only the first R nodes (they still attend over all B);
                ``None`` updates all. The refined forward pass only needs node 0.

        Returns:
            (..., R, d) updated features of the first R nodes.
        """
        receivers = h if num_receivers is None else h[..., :num_receivers, :]
        return self.update(receivers, self.q(receivers), self.k(h), self.v(h))

    def update(self, receivers: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Eq. 2-6 from projected features: receivers/q (..., R, d), k/v (..., B, d) -> (..., R, d)."""
        messages = self.attend(q, k, v)  # (..., R, d)
        x = self.norm1(receivers + self.dropout(self.out(messages)))  # Eq. 5
        hidden = self.ff_dropout(self.ff[1](self.ff[0](x)))  # (..., R, ff_dim)
        return self.norm2(x + self.dropout(self.ff[2](hidden)))  # Eq. 6

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(..., R, d), (..., B, d) -> (..., M, R, B) attention weights alpha (Eq. 3 + softmax).

        With ``null_logit`` the softmax has one more logit fixed at 0 (its weight is dropped).
        """
        return self.attention.weights(q, k)  # explicit path

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multi-head messages (Eq. 4): cat over heads of sum_j alpha_ij W_v h_j -> (..., R, d)."""
        return self.attention(q, k, v)[0]  # SDPA: (..., R, d) queries over (..., B, d) keys and values


class MessagePassingNetwork(nn.Module):
    """An optional input Linear, then ``L`` :class:`MessagePassingLayer` steps.

    :meth:`forward` refines training batches (every node, every layer); :meth:`forward_batches`
    refines node 0 of many index batches into a shared node table (test time).
    """

    def __init__(
        self,
        dim: int,
        layers: int = 1,
        heads: int = 2,
        ff_dim: int | None = None,
        dropout: float = 0.1,
        null_logit: bool = False,
        input_projection: bool = True,
        attention_dropout: float = 0.0,
        ff_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ConfigError(f"The MPN needs at least 1 layer (--model.mpn.layers); got {layers}.")
        self.dim = dim
        self.input = nn.Linear(dim, dim) if input_projection else nn.Identity()
        self.layers = nn.ModuleList(
            MessagePassingLayer(dim, heads, ff_dim or 4 * dim, dropout, null_logit, attention_dropout, ff_dropout)
            for _ in range(layers)
        )

    @classmethod
    def from_config(cls, dim: int, config: MPNConfig) -> MessagePassingNetwork:
        """The network ``config`` describes on ``dim``-d nodes (``classifier_input`` is the method's business)."""
        return cls(dim, config.layers, config.heads, config.ff_dim, config.dropout, config.null_logit,
                   config.input_projection, config.attention_dropout, config.ff_dropout)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(..., B, d) node features -> the (..., B, d) output of every layer."""
        h = self.input(x)
        outputs = []
        for layer in self.layers:
            h = layer(h)
            outputs.append(h)
        return outputs

    def forward_batches(
        self, nodes: torch.Tensor, batches: torch.Tensor, chunk_size: int | None = None
    ) -> list[torch.Tensor]:
        """Refine node 0 of each index batch: the output of every layer for that node.

        Node-wise work (the input Linear and the first layer's q/k/v projections) is done once
        per node, then gathered; later layers run on the gathered batches, and the last one only
        updates node 0. Equal to ``forward(nodes[batches])`` restricted to node 0.

        Args:
            nodes: (N, d) node features shared by all batches.
            batches: (G, B) indices into ``nodes``; column 0 is the node being refined.
            chunk_size: batches per step (default: about 256 MiB of gathered features).

        Returns:
            ``L`` tensors of shape (G, d).
        """
        if batches.ndim != 2 or batches.shape[1] < 1:
            raise ValueError(f"batches must be a (G, B) index tensor; got shape {tuple(batches.shape)}.")
        g, b = batches.shape
        chunk = chunk_size or max(1, DEFAULT_MEMORY_BUDGET // (4 * 4 * b * self.dim))
        first, rest = self.layers[0], self.layers[1:]
        h0 = self.input(nodes)  # (N, d)
        q0, k0, v0 = first.q(h0), first.k(h0), first.v(h0)  # (N, d) each
        outputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        for start in range(0, g, chunk):
            idx = batches[start : start + chunk]  # (c, B)
            recv = idx if rest else idx[:, :1]  # every node feeds the next layer; else node 0 only
            h = first.update(h0[recv], q0[recv], k0[idx], v0[idx])  # (c, R, d)
            outputs[0].append(h[:, 0])
            for i, layer in enumerate(rest, start=1):
                h = layer(h, num_receivers=None if i < len(self.layers) - 1 else 1)
                outputs[i].append(h[:, 0])
        return [torch.cat(o) if o else nodes.new_zeros(0, self.dim) for o in outputs]


# ============================================================================ options
@dataclass(frozen=True)
class MPNConfig:
    """The message-passing network that refines the batch graph: depth, attention, classifier input.

    Args:
        layers: L, message-passing steps.
        heads: attention heads per step (must divide ``embedding_dim``).
        ff_dim: hidden size of the feed-forward block (default ``4 * embedding_dim``).
        dropout: dropout after attention and feed-forward.
        null_logit: the public code's attention softmax with an implicit extra zero logit;
            ``False`` (default) is the paper's plain softmax.
        input_projection: a Linear on the normalised embeddings before the first step
            (the public code's architecture).
        classifier_input: ``last`` layer's output (the paper) or ``concat`` of every
            layer's output (the public Cars recipe) feeds the MPN classifier; it is also the
            refined test embedding.
        attention_dropout: dropout on the attention weights (the public code: 0.1; the paper
            does not mention it).
        ff_dropout: dropout inside the feed-forward block, between its Linears (the public
            code: 0.1).
        freeze_bn_bias: freeze the bias of the MPN classifier's BatchNorm (the public code's
            BNNeck does; its weight still trains).
    """

    layers: int = 1
    heads: int = 2
    ff_dim: int | None = None
    dropout: float = 0.1
    null_logit: bool = False
    input_projection: bool = True
    classifier_input: ClassifierInput = "last"
    attention_dropout: float = 0.0
    ff_dropout: float = 0.0
    freeze_bn_bias: bool = False

    def __post_init__(self) -> None:
        check_all([
            ("model.mpn.attention_dropout", self.attention_dropout, 0.0 <= self.attention_dropout <= 1.0, "in [0, 1]"),
            ("model.mpn.ff_dropout", self.ff_dropout, 0.0 <= self.ff_dropout <= 1.0, "in [0, 1]"),
            ("model.mpn.layers", self.layers, self.layers >= 1, ">= 1"),
            ("model.mpn.heads", self.heads, self.heads >= 1, ">= 1, a divisor of --model.embedding_dim"),
            ("model.mpn.ff_dim", self.ff_dim, self.ff_dim is None or self.ff_dim >= 1, ">= 1, or null for 4 * embedding_dim"),
            ("model.mpn.dropout", self.dropout, 0.0 <= self.dropout <= 1.0, "in [0, 1]"),
        ], "intra_batch")  # fmt: skip
        check_choice("--model.mpn.classifier_input", self.classifier_input, ClassifierInput)


@dataclass(frozen=True)
class LossConfig:
    """The two label-smoothing cross-entropies: on the backbone embedding and on the MPN output.

    Args:
        temperature: logits of both classifiers are divided by it.
        label_smoothing: epsilon of both cross-entropies.
        backbone_weight: weight of the auxiliary (backbone classifier) loss (0: Table 3's "MPN Loss"
            row, the MPN loss alone).
        mpn_weight: weight of the MPN classifier loss (0: the public SOP config, which the sop recipe
            follows, and Table 3's "Cross-Entropy" row).
    """

    temperature: float = 0.2
    label_smoothing: float = 0.1
    backbone_weight: float = 1.0
    mpn_weight: float = 1.0

    def __post_init__(self) -> None:
        check_all([
            ("model.loss.temperature", self.temperature, self.temperature > 0, "> 0"),
            ("model.loss.label_smoothing", self.label_smoothing, 0.0 <= self.label_smoothing <= 1.0, "in [0, 1]"),
            ("model.loss.backbone_weight", self.backbone_weight, self.backbone_weight >= 0, ">= 0"),
            ("model.loss.mpn_weight", self.mpn_weight, self.mpn_weight >= 0, ">= 0"),
        ], "intra_batch")  # fmt: skip
        if self.backbone_weight + self.mpn_weight == 0:
            raise ConfigError(
                "intra_batch: --model.loss.backbone_weight and --model.loss.mpn_weight are both 0, so nothing is "
                "trained; set at least one of them > 0."
            )


@dataclass(frozen=True)
class ReciprocalConfig:
    """The trained MPN on reciprocal k-NN test batches (Supp. C.3), reported as ``test/refined/*``.

    Args:
        stages: when :meth:`IntraBatchMPN.refine` works: ``test`` (default: not during
            validation), ``val_and_test`` or ``never``.
        k1: k1 of the reciprocal neighbourhoods (clamped to the gallery size - 1).
        batch_size: nodes per reciprocal k-NN batch (clamped to the gallery size).
        alpha: overlap fraction of the expansion step (Eq. 7).
        strict_overlap: ``>`` instead of the paper's ``>=`` in Eq. 7 (the public code).
    """

    stages: RefineStages = "test"
    k1: int = 30
    batch_size: int = 7
    alpha: float = 2 / 3
    strict_overlap: bool = False

    def __post_init__(self) -> None:
        check_choice("--model.refine.stages", self.stages, RefineStages)
        check_all([
            ("model.refine.k1", self.k1, self.k1 >= 1, ">= 1"),
            ("model.refine.batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("model.refine.alpha", self.alpha, 0.0 <= self.alpha <= 1.0, "in [0, 1]"),
        ], "intra_batch")  # fmt: skip


_Config = TypeVar("_Config", MPNConfig, LossConfig, ReciprocalConfig)


def _as_config(cls: type[_Config], value: _Config | Mapping[str, Any], group: str) -> _Config:
    """A group's options as its dataclass; a mapping of its fields (Python callers) is converted."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"intra_batch: --model.{group} has no field {', '.join(map(repr, unknown))}; its fields are "
                f"{', '.join(cls.__dataclass_fields__)}."
            )
        return cls(**value)
    raise ConfigError(f"intra_batch: --model.{group} must be a {cls.__name__} or a mapping of its fields; got {value!r}.")


# ============================================================================ the method
@register_method("intra_batch")
class IntraBatchMPN(RetrievalMethod):
    """Intra-Batch MPN (Seidenschwarz et al., ICML 2021): attention over the mini-batch graph.

    Args:
        mpn: the message-passing network (:class:`MPNConfig`: steps, heads, feed-forward width,
            dropout, attention softmax, input Linear, what feeds the MPN classifier);
            ``--model.mpn.layers 2`` or ``--model.mpn '{"layers": 2, "heads": 8}'``.
        loss: the two classifiers' cross-entropies (:class:`LossConfig`: temperature, label
            smoothing, the weights of the backbone and the MPN loss); ``--model.loss.<field>``.
        refine: the MPN at test time on reciprocal k-NN batches (:class:`ReciprocalConfig`:
            when it runs, k1, batch size, alpha, strict overlap); ``--model.refine.<field>``.
        cnn_pool: global pooling of CNN backbones whose ``backbone.pool`` is unset (the
            reference uses max pooling); ViTs keep their preset's pooling.
        backbone, embedding_dim, optimizer, optimizer_args, lr, weight_decay, scheduler,
            lr_milestones: the base's arguments with this method's defaults (ResNet-50, 512-d,
            RAdam with the CUB lr and weight decay; the public trainer's schedule: at epochs 30
            and 50 (0-based) reload the best weights and continue at lr / 10).
        **kwargs: the other base arguments (num_classes, image_size, head_lr_mult, lr_gamma,
            warmup_steps).

    Python callers may pass a group as a mapping of its fields (``mpn={"layers": 2}``); it is
    stored (``self.hparams``, checkpoints) as the dataclass.
    """

    description = "Intra-Batch MPN: attention over the mini-batch graph + CE (Seidenschwarz et al. 2021)"

    def __init__(
        self,
        mpn: MPNConfig = MPNConfig(),
        loss: LossConfig = LossConfig(),
        refine: ReciprocalConfig = ReciprocalConfig(),
        cnn_pool: Pool | None = "max",
        backbone: BackboneConfig | None = None,
        embedding_dim: int | None = 512,
        optimizer: OptimizerName = "radam",
        optimizer_args: dict[str, Any] | None = None,
        lr: float = 1.5637e-4,
        weight_decay: float = 6.06e-6,
        scheduler: SchedulerName = "reload_best",
        lr_milestones: Sequence[int] | None = (30, 50),
        **kwargs: Any,
    ) -> None:
        # Every option is checked before the encoder is built (the dataclasses check their own fields).
        mpn = _as_config(MPNConfig, mpn, "mpn")
        loss = _as_config(LossConfig, loss, "loss")
        refine = _as_config(ReciprocalConfig, refine, "refine")
        if embedding_dim and embedding_dim % mpn.heads:
            raise ConfigError(
                f"intra_batch: --model.mpn.heads={mpn.heads} does not divide --model.embedding_dim={embedding_dim}; "
                "choose a number of heads that divides the embedding size."
            )
        backbone = backbone or BackboneConfig()
        preset = BACKBONES.get(backbone.name)
        if backbone.pool is None and cnn_pool is not None and preset is not None and preset.kind == "cnn":
            backbone = replace(backbone, pool=cnn_pool)
        super().__init__(  # save_hyperparameters() there stores mpn, loss and refine as the dataclasses above
            backbone=backbone,
            embedding_dim=embedding_dim,
            optimizer=optimizer,
            optimizer_args=optimizer_args,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            lr_milestones=list(lr_milestones) if lr_milestones is not None else None,
            **kwargs,
        )
        self.mpn_config, self.loss_config, self.refine_config = mpn, loss, refine
        num_classes = self.require_classes()
        dim = self.embedding_dim
        self.mpn = MessagePassingNetwork.from_config(dim, mpn)
        feature_dim = dim * (mpn.layers if mpn.classifier_input == "concat" else 1)
        self.backbone_classifier = nn.Linear(dim, num_classes)
        self.mpn_classifier = nn.Sequential(nn.BatchNorm1d(feature_dim), nn.Linear(feature_dim, num_classes, bias=False))
        if mpn.freeze_bn_bias:
            self.mpn_classifier[0].bias.requires_grad_(False)  # stays 0: a BNNeck without shift
        # A loss of weight 0 never reaches its head (the SOP recipe, Table 3 rows 1-2): frozen, so that DDP,
        # which expects a gradient for every trainable parameter, and the optimizer skip it.
        if not loss.mpn_weight:
            self.mpn.requires_grad_(False)
            self.mpn_classifier.requires_grad_(False)
        if not loss.backbone_weight:
            self.backbone_classifier.requires_grad_(False)

    # ------------------------------------------------------------------ training
    def mpn_features(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The MPN classifier's input from the per-layer outputs: last, or all concatenated."""
        return torch.cat(outputs, dim=-1) if self.mpn_config.classifier_input == "concat" else outputs[-1]

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.loss_config
        return F.cross_entropy(logits.float() / cfg.temperature, labels, label_smoothing=cfg.label_smoothing)

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        if images.ndim != 4:
            raise ValueError(f"intra_batch trains on (B, C, H, W) images; got shape {tuple(images.shape)}.")
        weights = self.loss_config
        emb = self.project(self.encode(images).pooled)  # (B, D) unnormalised
        terms: dict[str, torch.Tensor] = {}
        loss = emb.new_zeros(())
        if weights.backbone_weight:
            terms["backbone_ce"] = self._cross_entropy(self.backbone_classifier(emb), labels)
            loss = loss + weights.backbone_weight * terms["backbone_ce"]
        if weights.mpn_weight:
            refined = self.mpn_features(self.mpn(F.normalize(emb, dim=-1)))  # the batch is one graph
            terms["mpn_ce"] = self._cross_entropy(self.mpn_classifier(refined), labels)
            loss = loss + weights.mpn_weight * terms["mpn_ce"]
        return {"loss": loss, **terms}

    # ------------------------------------------------------------------ test time
    def _refine_now(self) -> bool:
        """Whether :meth:`refine` works now: never, always, or (default) outside validation."""
        stages = self.refine_config.stages
        if stages != "test":
            return stages == "val_and_test"
        trainer = self._trainer
        return trainer is None or not (trainer.validating or trainer.sanity_checking)

    @torch.no_grad()
    def refine_embeddings(
        self, embeddings: torch.Tensor, is_gallery: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MPN embeddings from reciprocal k-NN batches: (N, D) normalised -> (N, D') normalised.

        Every sample gets a batch drawn from the gallery (:func:`reciprocal_knn_batches`),
        the MPN refines all batches, and the sample keeps only its own output.
        """
        nodes = F.normalize(embeddings.float(), dim=-1)
        cfg = self.refine_config
        batches = reciprocal_knn_batches(nodes, is_gallery, cfg.k1, cfg.batch_size, cfg.alpha, cfg.strict_overlap)
        was_training = self.mpn.training
        self.mpn.eval()
        try:
            with torch.autocast(nodes.device.type, enabled=False):
                dtype = next(self.mpn.parameters()).dtype  # fp32, or bf16/fp16 under "-true" precision
                outputs = self.mpn.forward_batches(nodes.to(dtype), batches)
        finally:
            self.mpn.train(was_training)
        return F.normalize(self.mpn_features(outputs).float(), dim=-1)

    def refine(
        self, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor
    ) -> dict[str, Any] | None:
        """``{"": MPN-refined embeddings}`` from reciprocal k-NN batches (Supp. C.3), or ``None``.

        Queries outside the gallery (In-Shop) build their batches from gallery neighbours.
        """
        if not self._refine_now():
            return None
        if self.loss_config.mpn_weight == 0:
            warnings.warn("intra_batch: refining with an MPN that was trained without its loss "
                          "(--model.loss.mpn_weight 0); --model.refine.stages never skips it.", stacklevel=2)
        return {"": self.refine_embeddings(embeddings, is_gallery)}

    @classmethod
    def reference_names(cls, meta: Mapping[str, Any], refined: bool) -> list[str]:
        """The paper's rows by the losses a run trains with (benchmark/core/reference/intra_batch.csv).

        Both losses: ``intra_batch`` (Tables 1-2 and Table 3 row 3, backbone embeddings) and, for the
        refined output, ``intra_batch(reciprocal_knn_test)`` (Table 3 row 4). The backbone's
        cross-entropy alone (``loss.mpn_weight 0``): ``cross_entropy_only`` (Table 3 row 1), except on
        SOP, whose published "Ours" numbers the public SOP config trained exactly so (``fns: lsce``).
        The MPN loss alone (``loss.backbone_weight 0``): ``mpn_loss_only`` (Table 3 row 2). Only the
        two-loss model has a refined number; the MPN's steps x heads (Figs. 4-5) have no table.
        """
        backbone_loss = float(meta.get("backbone_loss_weight", 1.0))
        mpn_loss = float(meta.get("mpn_loss_weight", 1.0))
        if backbone_loss and mpn_loss:
            return ["intra_batch(reciprocal_knn_test)"] if refined else ["intra_batch"]
        if refined:
            return []
        if mpn_loss:
            return ["mpn_loss_only"]
        return ["intra_batch"] if meta.get("dataset") in CROSS_ENTROPY_ONLY_AS_PUBLISHED else ["cross_entropy_only"]

    def describe(self) -> dict[str, Any]:
        # Flat result metadata: the keys stay those of earlier results (mpn_layers, ...).
        mpn, loss = self.mpn_config, self.loss_config
        return {
            **super().describe(),
            "mpn_layers": mpn.layers,
            "mpn_heads": mpn.heads,
            "temperature": loss.temperature,
            "mpn_loss_weight": loss.mpn_weight,
            "backbone_loss_weight": loss.backbone_weight,
        }
