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
evaluated sample (Supp. C.3, :func:`reciprocal_knn_batches`) and keeps the sample's own output;
the evaluation callback reports it as ``test/refined/...``.

The batch construction works from a top-k neighbour graph (:func:`knn_graph`: chunked matrix
products, no N x N matrix and no full sort), is vectorised over all samples, and the MPN runs
on thousands of batches at once, so it reaches Stanford Online Products (60,502 test images)
on a CPU (``python -m benchmark perf reciprocal``). See docs/methods/intra_batch.md for the
equations, the recipes and the choices made where the paper is silent.

The file reads top-down: the MPN modules, the option groups of the method
(:class:`MPNConfig`, :class:`LossConfig`, :class:`ReciprocalConfig`), the LightningModule,
then the neighbour graph and the reciprocal k-NN batches it uses at test time.
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
from benchmark.core.validation import check_choice
from benchmark.nn.attention import Attention
from benchmark.nn.backbones import BACKBONES, BackboneConfig, Pool
from benchmark.nn.neighbours import exact_knn
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
            raise ValueError(
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
            raise ValueError(f"The MPN needs at least 1 layer (--model.mpn.layers); got {layers}.")
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
def _check_fields(group: str, rules: Sequence[tuple[str, Any, bool, str]]) -> None:
    """Raise one ConfigError listing every broken rule as ``--model.<group>.<field>=value``."""
    bad = [f"--model.{group}.{name}={value!r} (must be {rule})" for name, value, ok, rule in rules if not ok]
    if bad:
        raise ConfigError(f"intra_batch: {'; '.join(bad)}. Set {'it' if len(bad) == 1 else 'them'} to a valid value.")


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
        _check_fields("mpn", [
            ("attention_dropout", self.attention_dropout, 0.0 <= self.attention_dropout <= 1.0, "in [0, 1]"),
            ("ff_dropout", self.ff_dropout, 0.0 <= self.ff_dropout <= 1.0, "in [0, 1]"),
            ("layers", self.layers, self.layers >= 1, ">= 1"),
            ("heads", self.heads, self.heads >= 1, ">= 1, a divisor of --model.embedding_dim"),
            ("ff_dim", self.ff_dim, self.ff_dim is None or self.ff_dim >= 1, ">= 1, or null for 4 * embedding_dim"),
            ("dropout", self.dropout, 0.0 <= self.dropout <= 1.0, "in [0, 1]"),
        ])  # fmt: skip
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
        _check_fields("loss", [
            ("temperature", self.temperature, self.temperature > 0, "> 0"),
            ("label_smoothing", self.label_smoothing, 0.0 <= self.label_smoothing <= 1.0, "in [0, 1]"),
            ("backbone_weight", self.backbone_weight, self.backbone_weight >= 0, ">= 0"),
            ("mpn_weight", self.mpn_weight, self.mpn_weight >= 0, ">= 0"),
        ])  # fmt: skip
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
        _check_fields("refine", [
            ("k1", self.k1, self.k1 >= 1, ">= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("alpha", self.alpha, 0.0 <= self.alpha <= 1.0, "in [0, 1]"),
        ])  # fmt: skip


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


# ============================================================================ k-NN graph
# A tolerance on the reciprocal-overlap test so that alpha = 2/3 behaves as the exact fraction.
_OVERLAP_TOLERANCE = 1e-9


def _check_embeddings(embeddings: torch.Tensor, database: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D); got shape {tuple(embeddings.shape)}.")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values; the neighbour graph needs finite features.")
    database = torch.as_tensor(database, dtype=torch.bool, device=embeddings.device).flatten()
    if database.numel() != len(embeddings):
        raise ValueError(f"The database mask has {database.numel()} entries for {len(embeddings)} embeddings.")
    return embeddings.float(), database


def knn_graph(
    embeddings: torch.Tensor,
    database: torch.Tensor,
    k: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-first k-nearest-neighbour lists into a database, by squared Euclidean distance.

    Row i is ``[i, n_1, ..., n_k]``: the sample itself, then its k nearest *other* database
    samples ordered by (distance, index); a sample outside the database still comes first in
    its own list. Exact (ties broken by the lower index) without an N x N matrix and without
    sorting rows: the shared exact search (:func:`benchmark.nn.neighbours.exact_knn`, torch
    backend) on ``[a, 1] . [2 b, -||b||^2] = ||a||^2 - ||a - b||^2``.

    Args:
        embeddings: (N, D) features (any norm).
        database: (N,) bool, the samples that can be neighbours (at least ``k + 1``).
        k: neighbours per sample besides itself.
        chunk_size: rows per product (default: about 256 MiB of distances per chunk).

    Returns:
        ``(indices, distances)``, (N, k + 1) int64 and float32; column 0 is the sample itself
        at distance 0.
    """
    return _knn_graph(*_check_embeddings(embeddings, database), k, chunk_size)


def _knn_graph(
    emb: torch.Tensor, database: torch.Tensor, k: int, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn_graph` on checked float32 embeddings and a bool database mask.

    ``||a - b||^2 = ||a||^2 - [a, 1] . [2 b, -||b||^2]``: the largest inner products of the
    exact search (:func:`benchmark.nn.neighbours.exact_knn`, ties by the lower database row, i.e.
    the lower sample index) are the smallest distances, and a sample is excluded from its own
    list by its index.
    """
    n, device = emb.shape[0], emb.device
    db = database.nonzero().flatten()  # (M,) ascending sample index
    m = db.numel()
    if k < 1 or k > m - 1:
        raise ValueError(f"k={k} neighbours need 1 <= k <= (database size - 1) = {m - 1}.")
    sq = emb.pow(2).sum(1)  # (N,)
    queries = torch.cat([emb, emb.new_ones(n, 1)], 1)  # (N, D+1) [a, 1]
    rows = torch.cat([emb[db] * 2, -sq[db, None]], 1)  # (M, D+1) [2 b, -||b||^2]
    samples = torch.arange(n, device=device)
    found, scores = exact_knn(queries, rows, k, query_ids=samples, database_ids=db, chunk_size=chunk_size)
    indices = torch.cat([samples[:, None], db[found]], 1)  # (N, k+1): the sample itself first
    distances = torch.cat([emb.new_zeros(n, 1), sq[:, None] - scores], 1)  # ||a||^2 - score
    return indices, distances


def _edge_keys(nbr: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted keys ``j * N + n`` of the edges j -> n of the lists ``N_k(j)`` (for membership)."""
    n = len(nbr)
    return (torch.arange(n, device=nbr.device)[:, None] * n + nbr[:, : k + 1]).flatten().sort().values


def _has_edge(keys: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """Whether ``dst`` is in the list of ``src`` (any shape), by binary search in ``keys``."""
    key = src * n + dst
    pos = torch.searchsorted(keys, key.flatten()).clamp_(max=len(keys) - 1).view_as(key)
    return keys[pos] == key


def _row_lookup(values: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise membership: is ``values[r, w]`` in ``table[r]`` (distinct entries), and where.

    Returns ``(found (c, W) bool, position (c, W) long)``: the column of ``table`` holding
    the value (meaningful where found).
    """
    sorted_table, perm = table.sort(dim=1)  # (c, L)
    pos = torch.searchsorted(sorted_table, values).clamp_(max=table.shape[1] - 1)  # (c, W)
    found = sorted_table.gather(1, pos) == values
    return found, perm.gather(1, pos)


def _reciprocal_mask(
    nbr: torch.Tensor, dist: torch.Tensor, keys: torch.Tensor, outside: torch.Tensor, k: int, rows: torch.Tensor
) -> torch.Tensor:
    """(c, k + 1) bool: is row sample x among the k nearest of its p-th neighbour j?

    For a database sample x this is list membership (``keys`` from :func:`_edge_keys`). A
    sample outside the database attaches to the fixed database lists: it counts as a
    neighbour of j when it would rank before j's k-th neighbour, by (distance, index).
    Position 0 (x itself) is always reciprocal.
    """
    cand = nbr[rows, : k + 1]  # (c, k+1) neighbours j of each x
    member = _has_edge(keys, cand, rows[:, None].expand_as(cand), len(nbr))  # x in N_k(j)
    d_xj = dist[rows, : k + 1]  # (c, k+1) distance x -> j (= j -> x)
    d_kth, n_kth = dist[cand, k], nbr[cand, k]  # (c, k+1) j's k-th neighbour
    beats = (d_xj < d_kth) | ((d_xj == d_kth) & (rows[:, None] < n_kth))
    mask = torch.where(outside[rows, None], beats, member)
    mask[:, 0] = True
    return mask


def reciprocal_knn_batches(
    embeddings: torch.Tensor,
    database: torch.Tensor | None = None,
    k1: int = 30,
    batch_size: int = 7,
    alpha: float = 2 / 3,
    strict_overlap: bool = False,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """A reciprocal k-NN batch around every sample (paper Supp. C.3), all samples at once.

    For a sample x, with ``N_k(j)`` = j followed by its k nearest database samples
    (:func:`knn_graph`) and ``k2 = round(k1 / 2)``:

    1. ``R(x) = {j in N_k1(x) : x in N_k1(j)}`` (x included);
    2. for every ``c in R(x)``: ``R2(c) = {j in N_k2(c) : c in N_k2(j)}``; if
       ``|R2(c) & R(x)| >= alpha |R2(c)|`` (``>`` with ``strict_overlap``), add ``R2(c)``;
    3. the union, ordered by distance to x (x first, ties by index), truncated to
       ``batch_size``; if it is smaller, x's nearest samples not yet in it fill it up.

    Samples outside the database (In-Shop queries) build their batch from database samples:
    their neighbours are database samples, and they join a database sample's list when they
    would rank before its k-th neighbour (they never displace anything, so database lists do
    not depend on the query). Everything is vectorised over chunks of samples.

    Args:
        embeddings: (N, D) features (L2-normalised at test time).
        database: (N,) bool, the samples batches draw from (the gallery); default all.
        k1: reciprocal neighbourhood size (clamped to database size - 1).
        batch_size: samples per batch (clamped to the database size).
        alpha: expansion overlap fraction.
        strict_overlap: ``>`` instead of the paper's ``>=`` in the overlap test.
        chunk_size: samples processed together in the expansion step.

    Returns:
        (N, batch_size) int64 sample indices; column 0 is the sample itself.
    """
    if database is None:
        database = torch.ones(len(embeddings), dtype=torch.bool, device=embeddings.device)
    emb, database = _check_embeddings(embeddings, database)
    n, device = len(emb), emb.device
    m = int(database.sum())
    if m < 2:
        raise ValueError(f"Reciprocal k-NN batches need at least 2 database (gallery) samples; got {m}.")
    if k1 < 1 or batch_size < 1 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Need k1 >= 1, batch_size >= 1 and 0 <= alpha <= 1; got {k1}, {batch_size}, {alpha}.")
    k1 = min(k1, m - 1)
    batch_size = min(batch_size, m)
    k2 = min(round(k1 / 2), k1)
    kk = max(k1, batch_size - 1)  # fill-up candidates come from the same lists
    nbr, dist = _knn_graph(emb, database, kk)  # (N, kk+1)
    outside = ~database
    out = torch.empty(n, batch_size, dtype=torch.long, device=device)
    # R2 of every sample depends only on the sample (and, outside the database, on itself).
    all_rows = torch.arange(n, device=device)
    keys1, keys2 = _edge_keys(nbr, k1), _edge_keys(nbr, k2)
    mask2 = torch.cat([_reciprocal_mask(nbr, dist, keys2, outside, k2, r) for r in all_rows.split(chunk_size)])
    for rows in all_rows.split(chunk_size):
        mask1 = _reciprocal_mask(nbr, dist, keys1, outside, k1, rows)  # (c, k1+1): R(x) over N_k1(x)
        out[rows] = _batches_for_rows(emb, nbr, dist, outside, mask1, mask2, rows, k1, k2, batch_size, alpha,
                                      strict_overlap)
    return out


def _batches_for_rows(
    emb: torch.Tensor,
    nbr: torch.Tensor,
    dist: torch.Tensor,
    outside: torch.Tensor,
    mask1: torch.Tensor,
    mask2: torch.Tensor,
    rows: torch.Tensor,
    k1: int,
    k2: int,
    batch_size: int,
    alpha: float,
    strict: bool,
) -> torch.Tensor:
    """Steps 2-3 of :func:`reciprocal_knn_batches` for a chunk of samples -> (c, batch_size).

    Ordering the expanded set E by distance to x needs no new distance: x's own list
    ``N(x)`` is sorted by (distance, index), so E's members in it come first, in list order,
    and every member outside it is farther than the whole list. Distances are computed only
    for rows whose list holds fewer than ``batch_size`` members of E.
    """
    c, device = rows.numel(), emb.device
    forward = nbr[rows, : k1 + 1]  # (c, k1+1)
    # R2(c) of every neighbour c, plus x itself when it joins c's list from outside the database.
    lists2 = nbr[forward, : k2 + 1]  # (c, k1+1, k2+1)
    in2 = mask2[forward]  # (c, k1+1, k2+1)
    pos = torch.arange(k1 + 1, device=device)
    d_xc = dist[rows, : k1 + 1]  # (c, k1+1)
    d_kth, n_kth = dist[forward, k2], nbr[forward, k2]  # c's k2-th neighbour
    x_joins = (pos > 0) & (pos <= k2) & outside[rows, None]  # c among x's first k2 ...
    x_joins &= (d_xc < d_kth) | ((d_xc == d_kth) & (rows[:, None] < n_kth))  # ... and x before c's k2-th
    # Eq. 7: |R2(c) & R(x)| >= alpha |R2(c)|; R(x) is the reciprocal part of N_k1(x).
    found, where = _row_lookup(lists2.flatten(1), forward)  # (c, W), W = (k1+1)(k2+1)
    in_r = (found & mask1.gather(1, where)).view_as(in2)
    count = (in2 & in_r).sum(-1) + x_joins  # x is always in R(x)
    size = in2.sum(-1) + x_joins
    bound = alpha * size.double()
    grow = count.double() > bound + _OVERLAP_TOLERANCE if strict else count.double() >= bound - _OVERLAP_TOLERANCE
    grow &= mask1  # (c, k1+1): c is reciprocal and R2(c) is added
    grown = torch.where(in2 & grow[..., None], lists2, torch.full_like(lists2, -1)).flatten(1)  # (c, W), -1 = none
    # Which entries of x's list are in E = R(x) + the grown R2 sets.
    near = nbr[rows]  # (c, K+1), nearest first
    kk1 = near.shape[1]
    found, where = _row_lookup(grown, near)  # (c, W)
    in_e = torch.zeros(c, kk1, dtype=torch.uint8, device=device).scatter_reduce_(
        1, where, found.to(torch.uint8), "amax"
    ).bool()
    in_e[:, : k1 + 1] |= mask1
    # E's members in list order, then the fill-up (the rest of the list, in order).
    order = (~in_e).long() * kk1 + torch.arange(kk1, device=device)  # (c, K+1)
    out = near.gather(1, order.argsort(dim=1)[:, :batch_size])
    far = (grown >= 0) & ~found  # (c, W) members of E beyond x's list
    short = ((in_e.sum(1) < batch_size) & far.any(1)).nonzero().flatten()
    if short.numel():  # too few members of E in the list, more beyond it: order those by distance
        out[short] = _batches_beyond_list(emb, rows[short], near[short], in_e[short], grown[short], far[short],
                                          batch_size)
    return out


def _batches_beyond_list(
    emb: torch.Tensor,
    rows: torch.Tensor,
    near: torch.Tensor,
    in_e: torch.Tensor,
    grown: torch.Tensor,
    far: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Batches of rows whose list holds fewer than ``batch_size`` members of E.

    Order: E's members in the list (list order), E's members beyond it (``far``) by
    (distance, index), then the list's other entries (list order); the first ``batch_size``.
    """
    c, kk1, n, device = rows.numel(), near.shape[1], len(emb), emb.device
    x_loc, col = far.nonzero(as_tuple=True)
    pair = (x_loc * n + grown[x_loc, col]).unique()  # sorted by row, then index; no duplicates
    x_far, s_far = pair // n, pair % n
    x = rows[x_far]
    d_far = emb[x].pow(2).sum(1) + emb[s_far].pow(2).sum(1) - 2 * (emb[x] * emb[s_far]).sum(1)
    # Lexicographic (row, group, list position, distance, index) with group 0 = E in the
    # list, 1 = E beyond it, 2 = the rest of the list.
    row_id = torch.cat([torch.arange(c, device=device).repeat_interleave(kk1), x_far])
    group = torch.cat([torch.where(in_e, 0, 2).flatten(), torch.ones_like(x_far)])
    position = torch.cat([torch.arange(kk1, device=device).repeat(c), torch.zeros_like(x_far)])
    distance = torch.cat([torch.zeros(c * kk1, device=device), d_far])
    sample = torch.cat([near.flatten(), s_far])
    order = sample.argsort(stable=True)
    order = order[distance[order].argsort(stable=True)]
    key = (row_id * 3 + group) * kk1 + position
    order = order[key[order].argsort(stable=True)]
    counts = torch.bincount(row_id, minlength=c)  # >= K + 1 >= batch_size per row
    starts = counts.cumsum(0) - counts
    return sample[order][starts[:, None] + torch.arange(batch_size, device=device)]
