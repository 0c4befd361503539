"""The shared base of every method: encoder + embedding head, evaluation, optimisers.

A method subclasses :class:`RetrievalMethod`, registers itself by name, and implements
:meth:`training_loss`. Everything a method does not override behaves the same for all:
evaluation batches return L2-normalised embeddings for the one evaluation callback, the
optimiser and schedule come from the constructor, and a non-finite loss, gradient or
weight norm stops training with a message before the weights change. Methods are plain modules:
tests drive ``training_loss`` and ``embed`` without a Trainer.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from tqdm.auto import tqdm

from benchmark.core import registry
from benchmark.core.contracts import DataRequest, evaluation_outputs, logs_this_step
from benchmark.core.errors import ConfigError
from benchmark.nn.backbones import BackboneConfig, Encoder, EncoderOutput
from benchmark.nn.distributed import gather_by_index

# The recipes' short optimizer names -> torch.optim class and the defaults the papers' code
# uses with it; any other torch.optim class is accepted by its class name ("NAdam", "Adagrad"),
# and --model.optimizer_args passes further arguments (betas, eps, nesterov ...).
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, {}),
    "adam": (torch.optim.Adam, {}),
    "radam": (torch.optim.RAdam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
}
OptimizerName = str  # a key of OPTIMIZERS or a torch.optim class name


def resolve_optimizer(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class and its default arguments for ``name`` (see :data:`OPTIMIZERS`)."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    cls = getattr(torch.optim, name, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return cls, {}
    raise ConfigError(
        f"Unknown optimizer {name!r} (--model.optimizer). Choose one of {', '.join(OPTIMIZERS)} or a torch.optim "
        "class name such as NAdam or Adagrad."
    )
SchedulerName = Literal["none", "multistep", "cosine", "reload_best"]


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the loss, the gradients or the weights became NaN or infinite."""


class RetrievalMethod(L.LightningModule):
    """Backbone -> embedding head -> method's loss; one evaluation path for all methods.

    Args:
        backbone: the encoder (a named timm preset, see ``python -m benchmark list``).
        embedding_dim: size of the linear embedding head on the pooled feature; ``None``
            uses the pooled feature itself (e.g. the ViT CLS token).
        num_classes: training classes; filled in from the datamodule by the CLI.
        image_size: input resolution; filled in from the datamodule by the CLI (ViT
            position embeddings are resampled to it).
        optimizer: ``adamw``, ``adam``, ``radam``, ``sgd`` (momentum 0.9) or the class name of
            any ``torch.optim`` optimizer.
        optimizer_args: further keyword arguments of the optimizer (``{"betas": [0.9, 0.99]}``).
        lr: learning rate of the backbone.
        weight_decay: weight decay of every parameter group.
        head_lr_mult: learning-rate multiplier of the parameters outside the backbone.
        scheduler: ``none``, ``multistep`` (divide by 1/lr_gamma at ``lr_milestones``
            epochs), ``cosine`` (per step over the whole run) or ``reload_best`` (the official
            Intra-Batch trainer's schedule: at the start of each ``lr_milestones`` epoch, reload the
            weights of the best validation so far, by :attr:`selection_metric`, and set the lr to
            base x ``lr_gamma``, not compounded).
        lr_milestones: epochs (0-based: the first epoch is 0) at which ``multistep`` multiplies
            the lr by ``lr_gamma`` and ``reload_best`` reloads the best weights.
        lr_gamma: ``multistep`` / ``reload_best`` factor.
        warmup_steps: linear warm-up of every group's lr from ~0 over this many optimizer
            steps (0: none), with the ``none`` or ``cosine`` schedule. ViTs trained from
            random weights need it: Adam's first, poorly estimated steps otherwise disturb
            the attention layers.
    """

    method_name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: The validation metric the method is judged by: it selects the "best" checkpoint and,
    #: under the holdout protocol, the checkpoint that is tested. A method whose judged output
    #: is refined (or otherwise derived) names that metric, e.g. ``val/refined/R@1``.
    selection_metric: ClassVar[str] = "val/R@1"
    selection_mode: ClassVar[Literal["max", "min"]] = "max"
    #: Constructor options whose values name one run's own inputs (e.g. the path of a stage-1
    #: checkpoint that differs per seed): left out of the comparison key that groups runs on the
    #: leaderboard (``benchmark.core.results.comparison_config``); ``describe()`` records what they stand for.
    per_run_options: ClassVar[tuple[str, ...]] = ()
    #: Images of one class per training batch the loss needs: 2 for losses on positive pairs
    #: (multi-similarity, margin), 1 for proxy and classification losses.
    min_samples_per_class: ClassVar[int] = 1

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        embedding_dim: int | None = None,
        num_classes: int | None = None,
        image_size: int = 224,
        optimizer: OptimizerName = "adamw",
        optimizer_args: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        head_lr_mult: float = 1.0,
        scheduler: SchedulerName = "none",
        lr_milestones: list[int] | None = None,
        lr_gamma: float = 0.1,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        bad = [
            f"{name}={value} (must be {rule})"
            for name, value, ok, rule in (
                ("lr", lr, lr > 0, "> 0"),
                ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
                ("head_lr_mult", head_lr_mult, head_lr_mult >= 0, ">= 0"),
                ("lr_gamma", lr_gamma, lr_gamma > 0, "> 0"),
                ("embedding_dim", embedding_dim, embedding_dim is None or embedding_dim >= 1, ">= 1 or null"),
                ("image_size", image_size, image_size >= 1, ">= 1"),
            )
            if not ok
        ]
        if bad:
            raise ConfigError(f"{type(self).__name__}: {'; '.join(bad)}. Set --model.<name> to a valid value.")
        resolve_optimizer(optimizer)  # an unknown name fails before any data pass
        if scheduler == "reload_best" and not lr_milestones:
            raise ConfigError(
                "scheduler reload_best needs the epochs to reload at: --model.lr_milestones [30, 50] (0-based)."
            )
        if warmup_steps < 0 or (warmup_steps and scheduler in ("multistep", "reload_best")):
            raise ConfigError(
                f"warmup_steps must be >= 0 and works with scheduler none or cosine; got warmup_steps={warmup_steps}, "
                f"scheduler={scheduler!r}."
            )
        self.save_hyperparameters()
        self._best_weights: dict[str, Any] | None = None  # reload_best: epoch, value, CPU state_dict
        self.backbone_config = backbone or BackboneConfig()
        self.num_classes = num_classes
        self.encoder = Encoder(self.backbone_config, image_size)
        feature_dim = self.encoder.feature_dim
        self.head: nn.Module = (
            nn.Linear(feature_dim, embedding_dim) if embedding_dim and embedding_dim != feature_dim else nn.Identity()
        )
        self.embedding_dim: int = embedding_dim or feature_dim

    # ------------------------------------------------------------------ embeddings
    def encode(self, images: torch.Tensor) -> EncoderOutput:
        """Backbone features of (B, C, H, W) images."""
        return self.encoder(images)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features -> (B, D) unnormalised embeddings."""
        return self.head(pooled)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, D) L2-normalised embeddings used for retrieval."""
        return F.normalize(self.project(self.encode(images).pooled), dim=-1)

    @torch.no_grad()
    def embed_loader(self, loader: Iterable[dict[str, Any]], desc: str = "embedding") -> torch.Tensor:
        """Embed every sample of an evaluation-style loader: (N, D) rows in dataset-index order.

        Under DDP each rank embeds its shard of a distributed loader and the rows are
        gathered and de-duplicated, so the work is done once across ranks. Shows a progress
        bar on rank 0 and logs the time taken as ``time/<desc>_s``.
        """
        was_training = self.training
        self.eval()
        start = time.perf_counter()
        trainer = self._trainer
        context = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
        # A bar only where the run shows Lightning's own (rank 0, progress bar enabled).
        # A bar only where someone watches: rank 0, a progress bar enabled, and a terminal (a bar's
        # carriage-return updates would fill a log file line by line).
        show = (trainer is None or (trainer.is_global_zero and trainer.progress_bar_callback is not None)) and (
            sys.stderr.isatty()
        )
        embeddings, indices = [], []
        with context:
            for batch in tqdm(loader, desc=desc, disable=not show, leave=False, dynamic_ncols=True):
                images = batch["image"].to(self.device, non_blocking=True)
                embeddings.append(self.embed(images).float())  # (b, D)
                indices.append(batch["index"].to(self.device))
        _, emb = gather_by_index(torch.cat(indices), torch.cat(embeddings))
        self.train(was_training)
        if trainer is not None:
            self.log(f"time/{desc}_s", time.perf_counter() - start, rank_zero_only=True)
        return emb

    def require_classes(self) -> int:
        """The number of training classes, or a clear error for heads that need it."""
        if not self.num_classes:
            raise ValueError(
                f"{type(self).__name__} needs num_classes (the CLI fills it from the datamodule; "
                "pass num_classes=datamodule.num_train_classes when building it by hand)."
            )
        return self.num_classes

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Return the method's loss terms; ``"loss"`` is the one optimised."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.training_loss(batch)
        loss = terms["loss"]
        self._step_terms = {k: v.detach() for k, v in terms.items()}  # checked before the optimizer step
        if logs_this_step(self._trainer):  # the steps whose values are written (the others cost time only)
            batch_size = len(batch["label"])
            for name, value in terms.items():
                key = "train/loss" if name == "loss" else f"train/{name}"
                self.log(key, value.detach(), prog_bar=name == "loss", batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop a diverging run: the loss and the gradient norm of every step, and the parameter
        norm at the logging steps, must be finite.

        Checking the loss alone misses most divergences: the embeddings are L2-normalised, so
        the loss stays finite while the weights grow without bound (Adam at lr 1e6 reached
        weights of 7e25 with a finite loss); their norm overflows float32 long before the
        weights become inf. A non-finite loss or gradient stops the run before the weights
        change. The parameter norm is one more pass over every weight (moving it off the other
        steps took the check from 22-31 to 13-19 ms a step in ``perf train`` on a 2-core CPU),
        and weights grow over many steps, so it is checked where Lightning writes the metrics (``logs_this_step``: every
        ``log_every_n_steps`` steps and the last batch of an epoch). One device sync per step.
        Under fp16 mixed precision non-finite gradients are the loss scaler's business (it
        skips the step).
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        terms = getattr(self, "_step_terms", {})
        loss = terms.get("loss", grads[0].new_zeros(()))
        grad_norm = _total_norm(grads)
        logs = logs_this_step(self._trainer)
        self._step_grad_norm = None
        if str(getattr(self._trainer, "precision", "")).startswith("16"):
            grad_norm = grad_norm.new_zeros(())
        else:
            if all(g.dtype == torch.float32 for g in grads):
                self._step_grad_norm = grad_norm  # reused by the clipping (configure_gradient_clipping)
            if logs:
                self.log("train/grad_norm", grad_norm, batch_size=1)
        values = [loss.float().reshape(()), grad_norm] + ([_total_norm(params)] if logs else [])
        health = torch.stack(values)  # (2,) or (3,)
        if bool(torch.isfinite(health).all()):
            return
        finite = torch.isfinite(health).tolist()
        what = [name for name, ok in zip(("loss", "gradient norm", "parameter norm"), finite) if not ok]
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        norms = f"gradient norm {health[1].item():.4g}" + (f", parameter norm {health[2].item():.4g}" if logs else "")
        if all(finite[:2]):  # only the weights: they grew over the steps since the last check
            when = ("The weights overflowed since the last check (every log_every_n_steps steps); "
                    "checkpoints/last.ckpt holds the last completed epoch.")
        else:
            when = "The weights were not updated with this step and checkpoints/last.ckpt holds the last completed epoch."
        raise NonFiniteLossError(
            f"{self.method_name or type(self).__name__}: training diverged at step {self.global_step}: non-finite "
            f"{' and '.join(what)} ({parts}; {norms}). {when} Lower the learning rate, enable gradient clipping "
            "(--trainer.gradient_clip_val 1), or use fp32 instead of fp16 mixed precision."
        )

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by norm with the gradient norm the health check has just computed: the arithmetic of
        ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)`` clamped at 1,
        one multiply of every gradient), one pass over the gradients fewer (about 9 ms a step for
        a ViT-S on a 2-core CPU). Other algorithms, fp16 and non-float32 gradients go to Lightning."""
        norm, self._step_grad_norm = getattr(self, "_step_grad_norm", None), None
        if not gradient_clip_val or gradient_clip_algorithm not in (None, "norm") or norm is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        coef = torch.clamp(float(gradient_clip_val) / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))

    # ------------------------------------------------------------------ reload_best schedule
    def on_validation_end(self) -> None:
        """``reload_best``: keep a CPU copy of the weights of the best validation so far."""
        trainer = self._trainer
        if self.hparams.get("scheduler") != "reload_best" or trainer is None or trainer.sanity_checking:
            return
        if trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.selection_metric)
        better = value is not None and bool(torch.isfinite(torch.as_tensor(value)))
        if better and self._best_weights is not None:
            previous = self._best_weights["value"]
            better = value > previous if self.selection_mode == "max" else value < previous
        better = bool(trainer.strategy.broadcast(better))  # every rank keeps the same weights
        if better:
            self._best_weights = {
                "epoch": int(self.current_epoch),
                "value": float(value),
                "state": {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()},
            }

    def on_train_epoch_start(self) -> None:
        """``reload_best``: at a milestone epoch, continue from the best weights so far."""
        trainer = self._trainer
        if self.hparams.get("scheduler") != "reload_best" or trainer is None:
            return
        if self.current_epoch not in set(self.hparams.lr_milestones or ()):
            return
        best = self._best_weights
        if best is None:
            rank_zero_warn(
                f"reload_best: no validation of {self.selection_metric} before epoch {self.current_epoch}; "
                "training continues from the current weights (validate more often: --trainer.check_val_every_n_epoch)."
            )
            return
        self.load_state_dict(best["state"])
        self.log("train/reloaded_epoch", float(best["epoch"]), rank_zero_only=True)
        if trainer.is_global_zero:
            print(
                f"[benchmark] epoch {self.current_epoch}: reloaded the best weights (epoch {best['epoch']}, "
                f"{self.selection_metric} = {best['value']:.4f}); lr = base x {self.hparams.lr_gamma}",
                flush=True,
            )

    def data_request(self) -> DataRequest:
        """What this method needs from the training data (normalisation, views, ...)."""
        return DataRequest(normalization=self.encoder.normalization, min_samples_per_class=self.min_samples_per_class)

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "apply_request"):
            datamodule.apply_request(self.data_request())

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return evaluation_outputs(self.embed(batch["image"]), batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch)

    def refine(
        self, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor
    ) -> dict[str, Any] | None:
        """Optional transductive test-time step (no labels): refined embeddings or rankings.

        Returns ``None`` (nothing to refine) or a dict whose values are (N, D') refined
        embeddings or ``RankedLists``; the evaluation callback reports them as
        ``<stage>/refined/<key>/...`` next to the plain metrics.
        """
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the registered name so :func:`load_method` can rebuild any method, and the
        ``reload_best`` schedule's best weights so that a resumed run reloads the same ones."""
        checkpoint["method_name"] = self.method_name
        checkpoint["method_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self._best_weights is not None:
            checkpoint["reload_best"] = self._best_weights

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._best_weights = checkpoint.get("reload_best")

    @classmethod
    def reference_names(cls, meta: Mapping[str, Any], refined: bool) -> list[str]:
        """The names under which the papers' reported numbers (``benchmark/core/reference/<paper>.csv``)
        list a run of this method described by ``meta`` (its recorded ``describe()`` fields);
        ``refined``: the numbers of its refined output (``refined/<metric>``). Default: the
        method's own name, or ``<name>_baseline`` as the papers' tables list baselines."""
        return [] if refined else [cls.method_name, f"{cls.method_name}_baseline"]

    def describe(self) -> dict[str, Any]:
        """Flat metadata recorded with every result."""
        return {
            "method": self.method_name or type(self).__name__,
            "backbone": self.backbone_config.name,
            "pretrained": bool(self.backbone_config.pretrained or self.backbone_config.weights),
            "weights": self.backbone_config.weights,
            "weights_sha256": self.encoder.weights_sha256,
            "embedding_dim": self.embedding_dim,
            "selection_metric": self.selection_metric,
        }

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Backbone parameters at ``lr``; everything else at ``lr * head_lr_mult``."""
        hp = self.hparams
        backbone = [p for p in self.encoder.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": backbone, "lr": hp.lr, "name": "backbone"}]
        if rest:
            groups.append({"params": rest, "lr": hp.lr * hp.head_lr_mult, "name": "head"})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.parameter_groups()
        cls, defaults = resolve_optimizer(hp.optimizer)
        extra = {**defaults, **(hp.get("optimizer_args") or {})}
        try:
            opt = cls(groups, lr=hp.lr, weight_decay=hp.weight_decay, **extra)
        except TypeError as err:
            raise ConfigError(f"--model.optimizer_args {extra} do not fit {cls.__name__}: {err}") from None
        warmup = int(hp.get("warmup_steps", 0))
        if hp.scheduler == "none" and not warmup:
            return opt
        if hp.scheduler == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.lr_milestones or []), gamma=hp.lr_gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if hp.scheduler == "reload_best":
            factor = _ReloadBestFactor(list(hp.lr_milestones), hp.lr_gamma)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if hp.scheduler not in ("none", "cosine"):
            raise ConfigError(f"Unknown scheduler {hp.scheduler!r}; choose none, multistep, cosine or reload_best.")
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=_LrFactor(warmup, total if hp.scheduler == "cosine" else 0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, in float32 (inf if it overflows)."""
    norms = torch._foreach_norm([t.detach() for t in tensors])  # one kernel per dtype/device group
    return torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))


class _ReloadBestFactor:
    """lr multiplier at epoch e for ``reload_best``: 1 before the first milestone, ``gamma`` after
    (the official Intra-Batch trainer sets lr = base / 10 at each reload, it does not divide again)."""

    def __init__(self, milestones: list[int], gamma: float) -> None:
        self.first, self.gamma = min(milestones), gamma

    def __call__(self, epoch: int) -> float:
        return self.gamma if epoch >= self.first else 1.0


class _LrFactor:
    """lr multiplier at optimizer step t: linear warm-up to 1 over ``warmup`` steps, then
    (if ``total`` > 0) a cosine decay to 0 at step ``total``. A class, not a closure, so the
    scheduler's state pickles into checkpoints."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        factor = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.total:
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))
        return factor


def load_method(checkpoint_path: str, map_location: str | torch.device = "cpu", **overrides: Any) -> RetrievalMethod:
    """Rebuild whichever registered method wrote ``checkpoint_path`` (its class and weights)."""
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    name = checkpoint.get("method_name")
    if not name:
        raise ValueError(f"{path} was not written by a benchmark method (no 'method_name' entry).")
    cls = registry.get_method(name)
    # weights_only=False: hyper-parameters of models built in Python hold dataclasses (BackboneConfig).
    return cls.load_from_checkpoint(path, map_location=map_location, weights_only=False, **overrides)


def load_frozen_method(checkpoint_path: str | Path, checkpoint: Mapping[str, Any] | None = None) -> RetrievalMethod:
    """Rebuild a trained method of any registered kind for inference only: frozen, in eval mode.

    For a method built on another method's embeddings (Context-Refine's stage-1 model). The
    backbone is built without downloading pretrained weights (they are in the checkpoint).
    ``checkpoint``: the file's contents if the caller has read them already (``torch.load``).
    """
    if checkpoint is None:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
    backbone = _backbone_config(checkpoint.get("hyper_parameters", {}).get("backbone"))
    del checkpoint
    overrides = (
        {"backbone": replace(backbone, pretrained=False, weights=None)} if backbone is not None else {}
    )
    model = load_method(str(checkpoint_path), **overrides)
    model.requires_grad_(False)
    return model.eval()


def _backbone_config(value: Any) -> BackboneConfig | None:
    """A checkpoint's ``backbone`` hyper-parameter (a BackboneConfig, another dataclass or a dict) as a BackboneConfig."""
    if value is None or isinstance(value, BackboneConfig):
        return value
    if is_dataclass(value):
        return BackboneConfig(**asdict(value))
    if isinstance(value, dict):
        return BackboneConfig(**{k: v for k, v in value.items() if k in BackboneConfig.__dataclass_fields__})
    raise TypeError(f"Cannot read a backbone configuration from {type(value).__name__}.")


def embed_output_dim(model: RetrievalMethod) -> int:
    """Size of what ``model.embed`` returns (a method may embed with more than its head)."""
    size = int(model.hparams.get("image_size", 224))
    with torch.no_grad():
        return int(model.embed(torch.zeros(2, 3, size, size)).shape[-1])
