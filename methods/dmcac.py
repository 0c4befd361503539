"""DMCAC: divergence minimisation over a training database + cross-attention classification.

Trivedy & Latecki, "Image Retrieval with Self-Supervised Divergence Minimization and
Cross-Attention Classification". The training split is divided, stratified over classes,
into a *query set* (the images training batches are drawn from) and a *database* whose
embeddings ``Z_D`` are computed without gradient and refreshed every ``retrieval.refresh_every``
epochs (or every ``retrieval.refresh_every_steps`` optimizer steps). For every query,
``A = views.count`` views (view 0 the un-augmented crop, the others RandAugment) are embedded
(``Z_A``, L2-normalised CLS tokens) and each view retrieves its ``k`` nearest database
entries; the union ``S`` of those indices (``T`` entries, ``T`` varies per query) gives
``Z_S``. With ``P' = softmax(Z_A Z_S^T / temperature)`` (A, T):

* ``L_frob`` (Eq. 11-13): the Frobenius norm of the strict lower triangle of the A x A
  matrix of Jensen-Shannon divergences between the rows of ``P'``;
* ``L_ce`` (Eq. 14-15): a linear classifier on every view embedding, cross-entropy;
* ``L_cac`` (Eq. 16-19): every view embedding attends over ``Z_S`` (query ``W_q z``, keys
  ``W_k Z_S``, values ``W_v Z_S``, scaled by ``1/sqrt(F)``), a linear classifier ``W_c`` on
  the result, cross-entropy.

``L = beta_frob L_frob + beta_ce L_ce + beta_cac L_cac`` (the ``loss`` options).
``retrieval.mode="full"`` uses the whole database instead of the union of neighbours;
``retrieval.mode="full_grad"`` also uses the whole database, re-embedded with gradient by the
current encoder at every training step (the database images are held in memory). At test
time the plain L2-normalised embedding of the un-augmented image is used (no refinement).

The constructor takes its options in groups (:class:`ViewConfig`, :class:`RetrievalConfig`,
:class:`LossConfig`, :class:`ClassifierConfig`), on the command line
``--model.retrieval.k 12`` or ``--model.retrieval '{"k": 12}'``.

The whole mini-batch is computed at once: unions of different sizes are padded to the
largest ``T`` in the batch and masked (a padded entry gets probability 0 in ``P'`` and
attention 0 in the cross-attention). See ``docs/methods/dmcac.md`` for the equations, the
choices made where the paper is silent and the degenerate cases. The building blocks live in
``benchmark/nn/``: the split (``splits``), the union of neighbours (``knn_context``), the JS terms
(``divergences``), the CAC head (``heads``) and the memory probes of ``full_grad`` (``memory_probe``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from benchmark.core.contracts import DataRequest, ViewRequest, register_method
from benchmark.core.errors import ConfigError
from benchmark.core.validation import check_choice, require
from benchmark.nn.backbones import BackboneConfig
from benchmark.nn.divergences import frobenius_lower, js_divergence_matrix, similarity_log_probs
from benchmark.nn.heads import CrossAttentionClassifier
from benchmark.nn.knn_context import union_of_neighbours
from benchmark.nn.memory_probe import available_memory_bytes, saved_activation_bytes
from benchmark.nn.neighbours import ExactIndex, faiss_available
from benchmark.nn.splits import stratified_split
from methods.base import RetrievalMethod

Retrieval = Literal["approximate", "full", "full_grad"]
DatabaseMode = Literal["split", "all"]
SearchBackend = Literal["auto", "faiss", "torch"]
ViewReduction = Literal["sum", "mean"]
Sampler = Literal["shuffle", "balanced"]


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True)
class ViewConfig:
    """The A views of each training query: what ``L_frob`` compares and the classifiers train on.

    Args:
        count: A, views per query; view 0 is the un-augmented training crop, the others are
            RandAugment of that crop. With 1 there is no pair and ``L_frob`` is 0.
        randaugment_ops: RandAugment operations per augmented view.
        randaugment_magnitude: RandAugment magnitude, 0-30 (torchvision's 31 bins).
    """

    count: int = 6
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9

    def __post_init__(self) -> None:
        require(self.count >= 1, "model.views.count", ">= 1 (view 0 is the un-augmented crop)", self.count)
        require(self.randaugment_ops >= 0, "model.views.randaugment_ops", ">= 0", self.randaugment_ops)
        require(0 <= self.randaugment_magnitude <= 30, "model.views.randaugment_magnitude", "in [0, 30]",
                 self.randaugment_magnitude)


@dataclass(frozen=True)
class RetrievalConfig:
    """The training database and what each view's ``P'`` covers in it (Eq. 8-10).

    Args:
        mode: ``approximate`` (the union of the views' ``k`` nearest database entries),
            ``full`` (every database entry, the stored gradient-free ``Z_D``) or ``full_grad``
            (every database entry, re-embedded by the current encoder *with gradient* at every
            training step, so that the loss terms' gradients reach the database images too:
            the paper's "end-to-end differentiable" full retrieval, Table 4).
        k: neighbours retrieved per view (approximate retrieval).
        temperature: softmax temperature of ``P'`` (1 in the paper).
        database: ``split`` (the paper: a stratified query/database split of the training
            images, disjoint) or ``all`` (every training image is in the database, as in the
            public code; a query never retrieves itself, by dataset index).
        database_fraction: share of each class's training images in the database (``split``).
        split_seed: seed of the query/database split (independent of the training seed).
        refresh_every: re-embed the database every this many epochs (0: only before training).
        refresh_every_steps: re-embed the database every this many optimizer steps, at the
            start of the step that is due (0: off, ``refresh_every`` counts). When > 0 it
            replaces ``refresh_every``: the database is embedded before training and then at
            steps ``n, 2n, ...``.
        backend: top-k search: ``faiss`` (IndexFlatIP, on GPU when faiss has GPUs and the model
            is on CUDA), ``torch`` (chunked exact matmul on the model's device), or ``auto``
            (faiss if installed).
        memory_check: ``full_grad`` only: before training, estimate the memory of one step
            (the database and the query views with their autograd activations) and stop with
            an error when it exceeds the free device memory (GPU) or the available RAM (CPU).
    """

    mode: Retrieval = "approximate"
    k: int = 12
    temperature: float = 1.0
    database: DatabaseMode = "split"
    database_fraction: float = 0.2
    split_seed: int = 0
    refresh_every: int = 15
    backend: SearchBackend = "auto"
    refresh_every_steps: int = 0
    memory_check: bool = True

    def __post_init__(self) -> None:
        check_choice("model.retrieval.mode", self.mode, Retrieval)
        require(self.k >= 1, "model.retrieval.k", ">= 1 (neighbours per view)", self.k)
        require(self.temperature > 0, "model.retrieval.temperature", "> 0", self.temperature)
        check_choice("model.retrieval.database", self.database, DatabaseMode)
        require(0.0 < self.database_fraction < 1.0, "model.retrieval.database_fraction", "in (0, 1)", self.database_fraction)
        require(self.split_seed >= 0, "model.retrieval.split_seed", ">= 0", self.split_seed)
        require(self.refresh_every >= 0, "model.retrieval.refresh_every", ">= 0 (0: only before training)", self.refresh_every)
        check_choice("model.retrieval.backend", self.backend, SearchBackend)
        require(self.refresh_every_steps >= 0, "model.retrieval.refresh_every_steps", ">= 0 (0: off, epochs count)",
                 self.refresh_every_steps)


@dataclass(frozen=True)
class LossConfig:
    """The weights of ``L = beta_frob L_frob + beta_ce L_ce + beta_cac L_cac`` (Eq. 20).

    A term of weight 0 is not computed and its head is not built (under DDP every parameter
    must get a gradient).

    Args:
        beta_frob: weight of ``L_frob``; 0 removes the term.
        beta_ce: weight of ``L_ce`` (and its classifier); 0 removes it.
        beta_cac: weight of ``L_cac`` (and its attention and classifier); 0 removes it.
        view_reduction: ``sum`` (the paper: CE terms summed over the views) or ``mean``; the
            batch is always averaged.
    """

    beta_frob: float = 1.0
    beta_ce: float = 1.0
    beta_cac: float = 1.0
    view_reduction: ViewReduction = "sum"

    def __post_init__(self) -> None:
        betas = (self.beta_frob, self.beta_ce, self.beta_cac)
        if min(betas) < 0 or max(betas) == 0:
            raise ConfigError(
                "The loss weights --model.loss.beta_frob, beta_ce, beta_cac must be >= 0 and not all 0; "
                f"got {betas}. Set at least one of them > 0."
            )
        check_choice("model.loss.view_reduction", self.view_reduction, ViewReduction)


@dataclass(frozen=True)
class ClassifierConfig:
    """The linear classifier of ``L_ce`` (Eq. 14) and the cross-attention classifier of ``L_cac`` (Eq. 16-18).

    Args:
        bias: bias in the two linear classifiers (the equations write none).
        logit_scale: multiplies both classifiers' logits. 1 is the paper's plain linear layer
            on the L2-normalised embedding; its logits then start within about +-0.5, which
            is enough when fine-tuning a pretrained encoder but leaves the cross-entropy near
            log C for hundreds of steps from random weights. A larger value (16, as in
            normalised-softmax classifiers) gives the encoder a useful signal from the start.
        attention_bias: bias in the cross-attention's ``W_q, W_k, W_v``.
        attention_temperature: divides the cross-attention's logits ``(W_q z)(W_k Z_S)^T / sqrt(F)``
            (1: the paper's Eq. 17). Below 1 the attention is sharper at initialisation, and the
            gradient ``L_cac`` sends to the encoder (only through the attention) larger; see
            ``python -m benchmark analyze dmcac loss_terms`` and docs/methods/dmcac.md.
    """

    bias: bool = True
    logit_scale: float = 1.0
    attention_bias: bool = False
    attention_temperature: float = 1.0

    def __post_init__(self) -> None:
        require(self.logit_scale > 0, "model.classifiers.logit_scale", "> 0 (1: the paper)", self.logit_scale)
        require(self.attention_temperature > 0, "model.classifiers.attention_temperature", "> 0 (1: the paper)",
                 self.attention_temperature)


# The constructor's flat options before they were grouped: old name -> new option path.
_RENAMED = {
    "num_views": "views.count",
    "randaugment_ops": "views.randaugment_ops",
    "randaugment_magnitude": "views.randaugment_magnitude",
    "k": "retrieval.k",
    "temperature": "retrieval.temperature",
    "database": "retrieval.database",
    "database_fraction": "retrieval.database_fraction",
    "split_seed": "retrieval.split_seed",
    "refresh_every": "retrieval.refresh_every",
    "search_backend": "retrieval.backend",
    "beta_frob": "loss.beta_frob",
    "beta_ce": "loss.beta_ce",
    "beta_cac": "loss.beta_cac",
    "view_reduction": "loss.view_reduction",
    "classifier_bias": "classifiers.bias",
    "logit_scale": "classifiers.logit_scale",
    "attention_bias": "classifiers.attention_bias",
}


# ---------------------------------------------------------------------------- the method
@register_method("dmcac")
class DMCAC(RetrievalMethod):
    """DMCAC (Trivedy & Latecki): JS-divergence matching of views over a training database + CAC.

    Args:
        views: the views per query and their RandAugment (``ViewConfig``: count,
            randaugment_ops, randaugment_magnitude).
        retrieval: the training database (query/database split, refresh) and which of its
            entries ``P'`` covers (``RetrievalConfig``: mode, k, temperature, database,
            database_fraction, split_seed, refresh_every, backend, refresh_every_steps,
            memory_check).
        loss: the weights of the three terms and the reduction over the views (``LossConfig``:
            beta_frob, beta_ce, beta_cac, view_reduction).
        classifiers: the two classifiers' biases and logit scale (``ClassifierConfig``: bias,
            logit_scale, attention_bias, attention_temperature).
        sampler: training batches of the query set: ``shuffle`` (plain random batches of
            ``classes_per_batch * samples_per_class``) or ``balanced`` (n classes x m images).
        backbone: the encoder; ``None`` is ViT-S/16 ImageNet-21k (``vit_small``).
        lr: learning rate of the backbone (AdamW 3e-5 in the paper).
        weight_decay: weight decay of every parameter group.
        **kwargs: everything :class:`RetrievalMethod` takes.
    """

    description = "DMCAC: JS divergence of views over a training database + cross-attention classification"

    def __init__(
        self,
        views: ViewConfig = ViewConfig(),
        retrieval: RetrievalConfig = RetrievalConfig(),
        loss: LossConfig = LossConfig(),
        classifiers: ClassifierConfig = ClassifierConfig(),
        sampler: Sampler = "shuffle",
        backbone: BackboneConfig | None = None,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        **kwargs: Any,
    ) -> None:
        # Every option is checked before the encoder is built (the groups check their own fields).
        renamed = [name for name in kwargs if name in _RENAMED]
        if renamed:
            raise ConfigError(
                "DMCAC's options are grouped: "
                + "; ".join(f"{name} is now --model.{_RENAMED[name]}" for name in renamed)
                + ". In Python: e.g. DMCAC(retrieval=RetrievalConfig(k=12))."
            )
        for name, value, cls in (
            ("views", views, ViewConfig),
            ("retrieval", retrieval, RetrievalConfig),
            ("loss", loss, LossConfig),
            ("classifiers", classifiers, ClassifierConfig),
        ):
            if not isinstance(value, cls):
                raise ConfigError(
                    f"DMCAC's {name} must be a {cls.__name__} (a group of options, e.g. --model.{name}.<field> "
                    f"or --model.{name} '{{\"<field>\": ...}}'); got {type(value).__name__} {value!r}."
                )
        check_choice("model.sampler", sampler, Sampler)
        super().__init__(backbone=backbone or BackboneConfig("vit_small"), lr=lr, weight_decay=weight_decay, **kwargs)
        self.views_config, self.retrieval_config = views, retrieval
        self.loss_config, self.classifiers_config = loss, classifiers
        self.sampler = sampler
        dim = self.embedding_dim
        # Heads exist only for terms that are used, so that every parameter gets a gradient (DDP).
        self.classifier = nn.Linear(dim, self.require_classes(), bias=classifiers.bias) if loss.beta_ce > 0 else None
        self.cac = (
            CrossAttentionClassifier(dim, self.require_classes(), classifiers.attention_bias, classifiers.bias,
                                     classifiers.attention_temperature)
            if loss.beta_cac > 0
            else None
        )
        # Database state: derived from the data and the encoder, rebuilt on demand, never saved.
        self.query_indices: np.ndarray | None = None  # training-split positions of the query set
        self.database_indices: np.ndarray | None = None  # training-split positions of the database
        self.database_embeddings: torch.Tensor | None = None  # (N, F) Z_D, no gradient
        self._database_ids: torch.Tensor | None = None  # (N,) training-split index of each row
        self._database_epoch = -1  # epoch at which the database was last embedded
        self._index: ExactIndex | None = None  # the search over Z_D (approximate retrieval)
        self._database_step = -1  # optimizer step at which the database was last embedded
        self._database_images: torch.Tensor | None = None  # (N, C, H, W) full_grad: re-embedded every step
        self.memory_estimate: dict[str, Any] | None = None  # full_grad: the check's figures
        self._warned_small_database = False
        self.refresh_seconds_total = 0.0
        self.refresh_count = 0

    # ------------------------------------------------------------------ data
    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def split_training_set(self, labels: np.ndarray) -> None:
        """Choose the query set and the database from the training labels (deterministic)."""
        n = len(labels)
        retrieval = self.retrieval_config
        if retrieval.database == "all":
            self.query_indices = self.database_indices = np.arange(n, dtype=np.int64)
        else:
            self.query_indices, self.database_indices = stratified_split(labels, retrieval.database_fraction, retrieval.split_seed)
        if len(self.database_indices) == 0:
            raise ConfigError(
                "DMCAC: the training database is empty: no training class has two images, so none can be in "
                "both the query set and the database. Use --model.retrieval.database all or a dataset with >= 2 "
                "images per class."
            )

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if stage == "fit" and dm is not None and hasattr(dm, "train_records"):
            self.split_training_set(dm.train_records.labels)
            batch = getattr(dm, "classes_per_batch", 0) * getattr(dm, "samples_per_class", 0)
            if self.sampler == "shuffle" and 0 < len(self.query_indices) < batch:
                raise ConfigError(
                    f"DMCAC: the query set has {len(self.query_indices)} images, fewer than one batch of {batch} "
                    "(classes_per_batch * samples_per_class); lower the batch size."
                )
        super().setup(stage)

    def data_request(self) -> DataRequest:
        config = self.views_config
        views = ViewRequest(
            num_views=config.count,
            augment="randaugment",
            randaugment_ops=config.randaugment_ops,
            randaugment_magnitude=config.randaugment_magnitude,
            keep_original=True,
        )
        return DataRequest(
            normalization=self.encoder.normalization, views=views, train_indices=self.query_indices, sampler=self.sampler
        )

    # ------------------------------------------------------------------ database
    def set_database(self, embeddings: torch.Tensor, train_indices: np.ndarray | torch.Tensor) -> None:
        """Install ``Z_D``: (N, F) L2-normalised embeddings and the training-split index of each row."""
        ids = torch.as_tensor(np.asarray(train_indices), dtype=torch.long, device=self.device)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids) or len(ids) == 0:
            raise ValueError(
                f"set_database needs (N, F) embeddings with N = len(train_indices) > 0; got {tuple(embeddings.shape)} "
                f"and {len(ids)} indices."
            )
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        self.database_embeddings = embeddings.detach().to(self.device, dtype).contiguous()
        self._database_ids = ids
        self._database_epoch = self.current_epoch
        self._database_step = self.global_step
        self._index = (
            ExactIndex(self.database_embeddings, ids, "faiss" if self._use_faiss() else "torch")
            if self.retrieval_config.mode == "approximate"
            else None
        )

    def _use_faiss(self) -> bool:
        retrieval = self.retrieval_config
        if retrieval.mode != "approximate" or retrieval.backend == "torch":
            return False
        if not faiss_available():
            if retrieval.backend == "faiss":
                raise ImportError("--model.retrieval.backend faiss needs faiss (pip install faiss-cpu); or use torch.")
            return False
        return True

    @torch.no_grad()
    def refresh_database(self) -> torch.Tensor:
        """Re-embed the database images (un-augmented, no gradient) with the current encoder.

        Under DDP every rank embeds its shard and the rows are gathered (``embed_loader``), so
        the database is computed once across ranks. Logs ``time/database_s`` (this refresh)
        and ``time/database_total_s`` (all refreshes so far) and prints a one-line summary.
        """
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "eval_dataloader"):
            raise RuntimeError(
                "DMCAC.refresh_database needs a trainer with a RetrievalDataModule; "
                "without one, call set_database(embeddings, train_indices) yourself."
            )
        if self.database_indices is None:
            self.split_training_set(dm.train_records.labels)
        start = time.perf_counter()
        records = dm.train_records.subset(self.database_indices)  # keeps order: row i = database_indices[i]
        embeddings = self.embed_loader(dm.eval_dataloader(records), desc="database")  # (N, F)
        self.set_database(embeddings, self.database_indices)
        elapsed = time.perf_counter() - start
        self.refresh_seconds_total += elapsed
        self.refresh_count += 1
        if self._trainer is not None:
            self.log("time/database_total_s", self.refresh_seconds_total, rank_zero_only=True)
        rank_zero_info(
            f"[dmcac] database refresh {self.refresh_count} (epoch {self.current_epoch}): {len(records)} images "
            f"embedded in {elapsed:.1f}s ({self.refresh_seconds_total:.1f}s in all refreshes)"
        )
        return self.database_embeddings

    def on_train_epoch_start(self) -> None:
        """Embed the database before the first epoch, then every ``retrieval.refresh_every`` epochs
        (unless ``retrieval.refresh_every_steps`` counts instead). ``full_grad``: load the database
        images once (they are embedded with gradient at every step)."""
        super().on_train_epoch_start()
        retrieval = self.retrieval_config
        if retrieval.mode == "full_grad":
            if self._database_images is None:
                self.load_database_images()
            return
        epoch, every = self.current_epoch, retrieval.refresh_every
        due = retrieval.refresh_every_steps == 0 and every > 0 and epoch % every == 0 and self._database_epoch != epoch
        if self.database_embeddings is None or due:
            self.refresh_database()

    def refresh_schedule(self) -> str:
        """One line: when the database is embedded in this run, in optimizer steps."""
        retrieval, trainer = self.retrieval_config, self._trainer
        if retrieval.mode == "full_grad":
            return "[dmcac] database: embedded with gradient at every training step (retrieval.mode full_grad)"
        max_steps = int(getattr(trainer, "max_steps", -1) or -1) if trainer is not None else -1
        if retrieval.refresh_every_steps > 0:
            every = retrieval.refresh_every_steps
            due = len(range(every, max_steps, every)) if max_steps > 0 else None
            return (f"[dmcac] database: embedded before training, then every {every} optimizer steps"
                    + (f" ({due} refreshes in {max_steps} steps)" if due is not None else ""))
        batches = getattr(trainer, "num_training_batches", float("inf")) if trainer is not None else float("inf")
        if retrieval.refresh_every == 0 or not math.isfinite(batches):
            return "[dmcac] database: embedded before training" + ("" if retrieval.refresh_every == 0 else
                                                                    f", then every {retrieval.refresh_every} epoch(s)")
        per_epoch = math.ceil(int(batches) / max(1, int(getattr(trainer, "accumulate_grad_batches", 1))))
        every = retrieval.refresh_every * per_epoch
        text = (f"[dmcac] database: embedded before training, then every {retrieval.refresh_every} epoch(s) = "
                f"{every} optimizer steps (an epoch is {per_epoch} steps)")
        if max_steps > 0:
            due = len(range(every, max_steps, every))
            text += f": {due} refresh{'es' if due != 1 else ''} in {max_steps} steps"
            if due == 0:
                text += " (the database keeps its initial embeddings; --model.retrieval.refresh_every_steps sets a period in steps)"
        return text

    def on_train_start(self) -> None:
        rank_zero_info(self.refresh_schedule())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """``retrieval.refresh_every_steps`` n > 0: re-embed the database before optimizer step
        n, 2n, ... (once per step, also under gradient accumulation)."""
        every = self.retrieval_config.refresh_every_steps
        if every <= 0 or self.retrieval_config.mode == "full_grad":
            return
        step = self.global_step
        if step > 0 and step % every == 0 and self._database_step != step:
            self.refresh_database()

    # ------------------------------------------------------------------ full_grad: the database with gradient
    def set_database_images(self, images: torch.Tensor, train_indices: np.ndarray | torch.Tensor) -> None:
        """Install the (N, C, H, W) database images that ``full_grad`` embeds at every step, and
        the training-split index of each."""
        ids = torch.as_tensor(np.asarray(train_indices), dtype=torch.long, device=self.device)
        if images.ndim != 4 or images.shape[0] != len(ids) or len(ids) == 0:
            raise ValueError(
                f"set_database_images needs (N, C, H, W) images with N = len(train_indices) > 0; got "
                f"{tuple(images.shape)} and {len(ids)} indices."
            )
        self._database_images = images.detach().to(self.device)
        self._database_ids = ids

    def load_database_images(self) -> torch.Tensor:
        """Load the database images (evaluation transform, no augmentation) onto the model's device.

        Every rank holds all of them (each embeds the whole database with gradient). With
        ``retrieval.memory_check`` the memory of a training step is estimated first
        (:meth:`check_full_grad_memory`) and an error stops the run before it would run out.
        """
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "eval_transform"):
            raise RuntimeError(
                "DMCAC.load_database_images needs a trainer with a RetrievalDataModule; "
                "without one, call set_database_images(images, train_indices) yourself."
            )
        if self.database_indices is None:
            self.split_training_set(dm.train_records.labels)
        n = len(self.database_indices)
        if self.retrieval_config.memory_check:
            batch = getattr(dm, "classes_per_batch", 0) * getattr(dm, "samples_per_class", 0)
            self.check_full_grad_memory(n, int(dm.image_size), batch * self.views_config.count)
        start = time.perf_counter()
        records = dm.train_records.subset(self.database_indices)  # keeps order: row i = database_indices[i]
        loader = DataLoader(dm.image_dataset(records, dm.eval_transform()), batch_size=dm.eval_batch_size, shuffle=False,
                            num_workers=dm.num_workers)
        images = torch.cat([b["image"] for b in loader])  # (N, C, H, W)
        self.set_database_images(images, self.database_indices)
        rank_zero_info(
            f"[dmcac] full_grad: {n} database images ({images.numel() * images.element_size() / 2**30:.2f} GiB) "
            f"loaded in {time.perf_counter() - start:.1f}s; they are embedded with gradient at every step"
        )
        return self._database_images

    def activation_bytes_per_image(self, image_size: int, context: Any = None) -> int:
        """Bytes of activations autograd keeps per (3, S, S) image embedded with gradient.

        Measured as the difference between a forward of two and of one random image (train mode,
        ``context`` or the trainer's precision context; BatchNorm statistics restored afterwards).
        """
        if context is None:
            trainer = self._trainer
            context = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
        buffers = [b.detach().clone() for b in self.buffers()]  # BatchNorm statistics: unchanged by the probe
        measure = lambda x: saved_activation_bytes(self, x, lambda im: self.project(self.encode(im).pooled))  # noqa: E731
        with context:
            probe = torch.randn(2, 3, image_size, image_size, device=self.device, dtype=self._input_dtype())
            one, two = measure(probe[:1].clone()), measure(probe)
        with torch.no_grad():
            for saved, b in zip(buffers, self.buffers()):
                b.copy_(saved)
        return max(two - one, 1)

    def check_full_grad_memory(self, num_database: int, image_size: int, query_images: int) -> dict[str, Any]:
        """Estimate the memory of one ``full_grad`` step and raise a ConfigError if it cannot fit.

        The activations autograd keeps per image are measured on one and two random images
        (train mode, the trainer's precision; normalisation buffers restored afterwards):
        ``need = per_image * (N + query views) + N images + 3 x trainable weights`` (their
        gradients and AdamW's two moments, allocated at the first step), against the free
        device memory (CUDA) or MemAvailable (CPU); the weights themselves are already
        allocated. Transient buffers (attention scores, the backward's own) are not counted,
        so a step estimated just under the limit can still fail.
        """
        per_image = self.activation_bytes_per_image(image_size)
        images_bytes = num_database * 3 * image_size * image_size * 4
        state_bytes = 3 * sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad)
        need = per_image * (num_database + query_images) + images_bytes + state_bytes
        available = available_memory_bytes(self.device)
        gib = 2**30
        self.memory_estimate = {
            "database_images": num_database, "query_images": query_images, "image_size": image_size,
            "activations_per_image_bytes": per_image, "database_images_bytes": images_bytes,
            "gradients_and_optimizer_bytes": state_bytes,
            "need_bytes": need, "available_bytes": available,
        }
        rank_zero_info(
            f"[dmcac] full_grad memory estimate: {per_image / 2**20:.1f} MiB of activations per image x "
            f"({num_database} database + {query_images} query views) + {images_bytes / gib:.2f} GiB of database "
            f"images + {state_bytes / gib:.2f} GiB of gradients and AdamW state = {need / gib:.1f} GiB"
            + (f"; {available / gib:.1f} GiB available on {self.device}" if available is not None else "")
        )
        if available is not None and need > available:
            raise ConfigError(
                f"DMCAC retrieval.mode full_grad: one training step needs about {need / gib:.1f} GiB (activations of "
                f"{per_image / 2**20:.1f} MiB per image for {num_database} database images and {query_images} query "
                f"views, at {image_size} px, plus the database images) but only {available / gib:.1f} GiB are free "
                f"on {self.device}. Lower --model.retrieval.database_fraction (the paper: 0.1 on CUB, 0.05 on Cars), "
                "turn on --backbone.grad_checkpointing true or bf16-mixed precision, lower the batch "
                "(--data.classes_per_batch with --trainer.accumulate_grad_batches), use the fixed database "
                "(--model.retrieval.mode full), or skip this check with --model.retrieval.memory_check false."
            )
        return self.memory_estimate

    def embed_database(self) -> torch.Tensor:
        """(N, F) L2-normalised embeddings of the held database images, with gradient (``full_grad``)."""
        if self._database_images is None:
            raise RuntimeError(
                "DMCAC full_grad: no database images yet. In a Trainer they are loaded at the start of training; "
                "by hand call load_database_images() or set_database_images(images, train_indices)."
            )
        images = self._database_images.to(self._input_dtype())
        return F.normalize(self.project(self.encode(images).pooled), dim=-1)

    def _input_dtype(self) -> torch.dtype:
        """The encoder's parameter dtype (float32 unless the model was cast, e.g. to float64)."""
        dtype = next(self.encoder.parameters()).dtype
        return dtype if dtype.is_floating_point else torch.float32

    # ------------------------------------------------------------------ retrieval
    def _effective_k(self, exclude_self: bool) -> int:
        n = self.database_embeddings.shape[0] - int(exclude_self)
        if n < 1:
            raise ValueError("DMCAC: the database holds only the query itself; it needs at least one other image.")
        k = self.retrieval_config.k
        if n < k and not self._warned_small_database:
            rank_zero_warn(f"DMCAC: the database has {n} usable entries, fewer than k={k}; retrieving {n} per view.")
            self._warned_small_database = True
        return min(k, n)

    @torch.no_grad()
    def retrieve(self, views: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
        """(B, A, F) view embeddings -> (B, A, k) database positions of each view's neighbours.

        With ``retrieval.database='all'`` the query's own image (same training-split index) is excluded.
        """
        b, a, f = views.shape
        exclude_self = self.retrieval_config.database == "all"
        k = self._effective_k(exclude_self)
        flat = views.reshape(b * a, f).to(self.database_embeddings.dtype)  # (B * A, F)
        ids = query_ids.to(flat.device).repeat_interleave(a) if exclude_self else None  # (B * A,) by dataset index
        if self._index is None:
            self._index = ExactIndex(self.database_embeddings, self._database_ids, "faiss" if self._use_faiss() else "torch")
        neighbours, _ = self._index.search(flat, k, ids)  # (B * A, k)
        return neighbours.to(views.device).reshape(b, a, k)

    # ------------------------------------------------------------------ loss
    def _reduce_views(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of (B, A, C) logits, summed (or averaged) over views, averaged over the batch."""
        b, a, _ = logits.shape
        ce = F.cross_entropy(logits.reshape(b * a, -1).to(torch.promote_types(logits.dtype, torch.float32)), labels.repeat_interleave(a))
        return ce * a if self.loss_config.view_reduction == "sum" else ce

    def loss_terms(
        self, views: torch.Tensor, labels: torch.Tensor, query_ids: torch.Tensor, database: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The DMCAC loss of (B, A, F) L2-normalised view embeddings against the current database.

        ``labels`` (B,) are class ids; ``query_ids`` (B,) training-split indices (used to keep a
        query out of its own neighbours when the database contains the query set).
        ``database``: full retrieval only, (N, F) embeddings of the database rows (in the order
        of ``_database_ids``) to use instead of the stored ``Z_D``, e.g. with gradient
        (``full_grad``); gradients then flow into them as well.
        """
        retrieval, weights, scale = self.retrieval_config, self.loss_config, self.classifiers_config.logit_scale
        if database is None:
            if self.database_embeddings is None:
                raise RuntimeError(
                    "DMCAC: no database embeddings yet. In a Trainer they are computed at the start of training; "
                    "by hand call refresh_database() or set_database(embeddings, train_indices)."
                )
            database = self.database_embeddings
        elif retrieval.mode == "approximate":
            raise ValueError("loss_terms(database=...) is for full retrieval; approximate retrieval searches the stored Z_D.")
        elif self._database_ids is None or database.shape[0] != len(self._database_ids):
            raise ValueError(
                f"loss_terms: database has {database.shape[0]} rows but the model holds "
                f"{0 if self._database_ids is None else len(self._database_ids)} database ids."
            )
        b, a, _ = views.shape
        js_dtype = torch.promote_types(views.dtype, torch.float32)  # fp32 (fp64 in tests) for the JS term
        database = database.to(views.device, js_dtype)
        if retrieval.mode in ("full", "full_grad"):
            keys, mask = database, None  # (N, F) shared by every query
            if retrieval.database == "all":  # a query never sees itself
                mask = self._database_ids[None, :] != query_ids[:, None]  # (B, N)
            union_size = mask.sum(dim=1).float().mean() if mask is not None else views.new_tensor(database.shape[0])
        else:
            neighbours = self.retrieve(views.detach(), query_ids)  # (B, A, k)
            indices, mask = union_of_neighbours(neighbours, database.shape[0])  # (B, T), (B, T)
            keys = database[indices]  # (B, T, F) Z_S, constants
            union_size = mask.sum(dim=1).float().mean()
        terms: dict[str, torch.Tensor] = {}
        total = views.new_zeros((), dtype=js_dtype)
        with torch.autocast(views.device.type, enabled=False):  # tiny JS values need fp32
            if weights.beta_frob > 0:
                log_p = similarity_log_probs(views.to(js_dtype), keys, mask, retrieval.temperature)  # (B, A, T)
                terms["frob"] = frobenius_lower(js_divergence_matrix(log_p)).mean()
                total = total + weights.beta_frob * terms["frob"]
        if self.classifier is not None:
            terms["ce"] = self._reduce_views(self.classifier(views) * scale, labels)
            total = total + weights.beta_ce * terms["ce"]
        if self.cac is not None:
            logits, _ = self.cac(views, keys.to(views.dtype), mask, return_attention=False)  # (B, A, C)
            terms["cac"] = self._reduce_views(logits * scale, labels)
            total = total + weights.beta_cac * terms["cac"]
        terms["union_size"] = union_size.detach()
        return {"loss": total, **terms}

    def embed_views(self, images: torch.Tensor) -> torch.Tensor:
        """(B, A, C, H, W) views -> (B, A, F) L2-normalised embeddings (all views in one pass)."""
        b, a = images.shape[:2]
        pooled = self.encode(images.flatten(0, 1)).pooled  # (B * A, C)
        return F.normalize(self.project(pooled), dim=-1).reshape(b, a, -1)

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        if images.ndim == 4:  # a single view per query
            images = images[:, None]
        if images.ndim != 5:
            raise ValueError(
                f"DMCAC expects (B, A, C, H, W) views, got {tuple(images.shape)}; train through a RetrievalDataModule "
                "so that the method's data_request() (views, query subset) is applied."
            )
        views = self.embed_views(images)
        database = None
        if self.retrieval_config.mode == "full_grad":
            database = self.embed_database()  # (N, F) with gradient, the current encoder
            self.database_embeddings = database.detach()  # for inspection; the loss uses the graph's copy
        return self.loss_terms(views, batch["label"], batch["index"], database)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "retrieval": self.retrieval_config.mode,
            "num_views": self.views_config.count,
            "k": self.retrieval_config.k,
            "database": self.retrieval_config.database,
            "database_fraction": self.retrieval_config.database_fraction,
            "refresh_every_steps": self.retrieval_config.refresh_every_steps,
            "attention_temperature": self.classifiers_config.attention_temperature,
        }

    @classmethod
    def reference_names(cls, meta: Mapping[str, Any], refined: bool) -> list[str]:
        """The paper's name for a run's setting (``benchmark/core/reference/dmcac.csv``): ``dmcac`` for
        approximate retrieval with the paper's 6 views and all loss weights 1 (Table 1), Table 2's
        loss-weight rows as ``dmcac(betas=[b_frob,b_ce,b_cac])`` and Table 3's view counts as
        ``dmcac(views=N)`` (one change at a time, as in the paper), and Table 4's full retrieval,
        which embeds the database with gradient (``full_grad``), as ``dmcac_full_retrieval``. The
        fixed-database ``full`` variant and other combinations have no paper number."""
        if refined:
            return []
        mode = meta.get("retrieval", "approximate")
        views = meta.get("num_views", 6)
        config = meta.get("config") or {}
        betas = [config.get(f"model.loss.beta_{term}", 1.0) for term in ("frob", "ce", "cac")]
        default_betas = all(b == 1 for b in betas)
        if mode == "full_grad":
            return ["dmcac_full_retrieval"] if views == 6 and default_betas else []
        if mode != "approximate":
            return []
        if views == 6:
            return ["dmcac"] if default_betas else [f"dmcac(betas=[{','.join(f'{float(b):g}' for b in betas)}])"]
        return [f"dmcac(views={views})"] if default_betas else []
