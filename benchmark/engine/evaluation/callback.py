"""The one evaluation callback: gathers evaluation embeddings, computes and records metrics.

:class:`RetrievalEvaluator` knows nothing of any particular method. Every method's
``validation_step`` / ``test_step`` returns a dict with ``embeddings`` (B, D), ``labels``
(B,), ``indices`` (B,) dataset indices within the evaluated split, ``is_query`` (B,) and
``is_gallery`` (B,). At the end of the epoch the callback

1. gathers the batches of every rank (uneven sizes included) and keeps one row per dataset
   index, which removes the duplicates that ``DistributedSampler`` pads in, so a DDP result
   equals a single-process one exactly;
2. calls the method's optional transductive ``refine(embeddings, is_query, is_gallery)``
   on every rank with the full set (never the labels);
3. computes the metrics on global rank 0 and broadcasts them, so every rank logs identical
   values (``val/R@1``, ``test/refined/R@1``, ``test/refined/level3/MAP@R`` ...);
4. writes ``<run_dir>/metrics_<stage>.json`` (global rank 0, atomically) with every
   evaluation of the run, and prints the final test result as a table;
5. keeps what it evaluated at test (:class:`Evaluation`: embeddings, labels, flags, dataset
   indices, the refined outputs and the metrics) as :attr:`RetrievalEvaluator.last_evaluation`
   on global rank 0, which the figure layer (:mod:`benchmark.engine.figures`) draws from without a
   second pass over the data.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from benchmark.core.contracts import EVALUATION_BACKENDS, EVALUATION_KEYS, RankedLists
from benchmark.core.io import atomic_write_text, console
from benchmark.core.results import (
    ROLE_CHECKPOINT,
    ROLE_FINAL,
    SELECTED_ON_HOLDOUT,
    SELECTED_ON_TEST,
    final_evaluation,
)
from benchmark.core.validation import check_choice, require
from benchmark.engine.evaluation.metrics import (
    count_duplicate_rows,
    nmi,
    ranked_list_metrics,
    retrieval_metrics,
)
from benchmark.nn.distributed import all_gather_uneven, gather_by_index, is_distributed

OUTPUT_KEYS = EVALUATION_KEYS



def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on (``"n/a"`` when not installed)."""

    def dist_version(*names: str) -> str:
        for name in names:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(name)
        return "n/a"

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": dist_version("lightning"),
        "timm": dist_version("timm"),
        "faiss": dist_version("faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu", "faiss-cpu", "faiss"),
        "pytorch_metric_learning": dist_version("pytorch-metric-learning"),
        "numpy": dist_version("numpy"),
    }


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


@dataclass
class Evaluation:
    """One evaluation as the evaluator scored it, on the CPU, rows in ascending dataset index.

    ``indices`` are the dataset indices within the evaluated split (rows of its records);
    ``refined`` is what the method's ``refine`` returned (refined embeddings or
    :class:`~benchmark.core.contracts.RankedLists`, by key); ``results`` the metrics by group (``""``
    for the plain embeddings, ``"refined"``, ``"refined/<key>"``).
    """

    stage: str
    embeddings: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    is_query: torch.Tensor
    is_gallery: torch.Tensor
    refined: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    epoch: int = 0
    global_step: int = 0
    recall_ks: tuple[int, ...] = (1,)
    seconds: float = 0.0  # the whole evaluation: the loop over the split, gather, refine, metrics


class RetrievalEvaluator(Callback):
    """Retrieval metrics of every validation and test epoch, for any method.

    Args:
        recall_ks: K of Recall@K; default: the datamodule's ``recall_ks`` (CUB/Cars
            1, 2, 4, 8; SOP 1, 10, 100, 1000; In-Shop 1, 10, 20, 30, 40), else (1, 2, 4, 8).
        nmi: compute NMI (faiss k-means with as many clusters as evaluated classes);
            default: the datamodule's ``compute_nmi``, else True. Costly at SOP scale.
        map_at_k: k of ``mAP@k`` (average precision over the top k, divided by min(R, k)).
        chunk_size: queries per similarity block; default bounds the block to 256 MiB.
        backend: ``"auto"`` (the module's device: CUDA when it is on a GPU, else CPU),
            ``"cpu"`` or ``"cuda"``. Every backend ranks identically (same tie policy).
        print_table: print the final test metrics as a table (global rank 0).
        refine_on_validation: also evaluate the method's ``refine`` output at validation;
            with False it is evaluated at test only.
        nmi_seed: seed of the k-means behind NMI (fixed, so NMI is reproducible).
    """

    #: Warn (once per evaluator) when more than this fraction of the evaluated embeddings
    #: repeat an earlier row: a collapsed model, not a few duplicate images.
    collapse_fraction: float = 0.01
    #: The stages whose last evaluation is kept as :attr:`last_evaluation` (global rank 0).
    keep_stages: tuple[str, ...] = ("test",)
    #: Write ``metrics_<stage>.json``; ``analyze`` turns it off (its evaluation is not a result of the run).
    write_results: bool = True

    def __init__(
        self,
        recall_ks: list[int] | None = None,
        nmi: bool | None = None,
        map_at_k: int = 1000,
        chunk_size: int | None = None,
        backend: str = "auto",
        print_table: bool = True,
        refine_on_validation: bool = True,
        nmi_seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("evaluation.backend", backend, EVALUATION_BACKENDS)
        require(recall_ks is None or (bool(recall_ks) and all(int(k) >= 1 for k in recall_ks)), "evaluation.recall_ks",
                "a non-empty list of positive integers", recall_ks)
        self.recall_ks = None if recall_ks is None else [int(k) for k in recall_ks]
        self.nmi = nmi
        self.map_at_k = int(map_at_k)
        self.chunk_size = chunk_size
        self.backend = backend
        self.print_table = print_table
        self.refine_on_validation = refine_on_validation
        self.nmi_seed = nmi_seed
        self._batches: list[dict[str, torch.Tensor]] = []
        self._history: dict[str, list[dict[str, Any]]] = {}
        self.last_metrics: dict[str, float] = {}
        self._epoch_start: float | None = None
        self.last_embed_seconds = 0.0  # the last evaluation's loop over its split (embedding), seconds
        self.last_evaluation: Evaluation | None = None
        self._collapse_warned = False
        #: What the next test evaluation is: ``"final"`` (the end of training; the command line sets it
        #: before the test that ``fit`` runs), ``"checkpoint"`` (a given checkpoint), or None to decide by
        #: whether a checkpoint file was loaded (weights in memory after training are the final ones).
        self.test_role: str | None = None
        self._previous_meta: dict[str, Any] = {}  # the top-level record of a finished run being tested again

    # ------------------------------------------------------------------ configuration
    def resolved_recall_ks(self, trainer: L.Trainer | None) -> tuple[int, ...]:
        if self.recall_ks is not None:
            return tuple(self.recall_ks)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return tuple(int(k) for k in getattr(dm, "recall_ks", (1, 2, 4, 8)))

    def resolved_nmi(self, trainer: L.Trainer | None) -> bool:
        if self.nmi is not None:
            return bool(self.nmi)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return bool(getattr(dm, "compute_nmi", True))

    def _device(self, pl_module: L.LightningModule) -> torch.device:
        if self.backend == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("RetrievalEvaluator(backend='cuda') but CUDA is not available; use 'auto' or 'cpu'.")
            return pl_module.device if pl_module.device.type == "cuda" else torch.device("cuda")
        if self.backend == "cpu":
            return torch.device("cpu")
        return pl_module.device if pl_module.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------------ collection
    def _reset(self) -> None:
        self._batches = []

    def _collect(self, outputs: Any, hook: str) -> None:
        if not isinstance(outputs, Mapping) or any(k not in outputs for k in OUTPUT_KEYS):
            got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise TypeError(
                f"RetrievalEvaluator: {hook} must return a dict with keys {list(OUTPUT_KEYS)}; got {got}. "
                "Return the method base's evaluation dict (see methods/base.py: _eval_step)."
            )
        emb = outputs["embeddings"]
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
            raise TypeError(f"RetrievalEvaluator: 'embeddings' must be a (B, D) tensor; got {getattr(emb, 'shape', emb)}.")
        batch = {"embeddings": emb.detach().float()}
        for key in OUTPUT_KEYS[1:]:
            value = torch.as_tensor(outputs[key]).detach()
            if value.shape != (emb.shape[0],):
                raise ValueError(
                    f"RetrievalEvaluator: '{key}' has shape {tuple(value.shape)} but the batch has "
                    f"{emb.shape[0]} embeddings; return one entry per sample."
                )
            batch[key] = value.to(device=emb.device, dtype=torch.bool if key.startswith("is_") else torch.int64)
        self._batches.append(batch)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The metrics are computed once on the full gathered set and broadcast, so they are identical on
        # every rank: Lightning's advice (at epoch end, under DDP) to log them with sync_dist=True does
        # not apply to them, nor to rank-zero timings. Installed when a trainer uses the evaluator, not at
        # import (a library module leaves the process's warning filters alone).
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test|time)/",
                                category=PossibleUserWarning)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._epoch_start = time.perf_counter()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._epoch_start = time.perf_counter()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking and dataloader_idx == 0:
            self._collect(outputs, "validation_step")

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if dataloader_idx == 0:
            self._collect(outputs, "test_step")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._reset()
            return
        self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluate(trainer, pl_module, "test")

    # ------------------------------------------------------------------ evaluation
    def _gather(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Every rank's batches, de-duplicated by dataset index, in ascending index order."""
        dim = self._batches[0]["embeddings"].shape[1] if self._batches else 0
        if is_distributed():  # a rank without batches must still send (0, D) embeddings
            dim = int(all_gather_uneven(torch.tensor([dim], device=pl_module.device)).max())
        if self._batches:
            local = {k: torch.cat([b[k] for b in self._batches]) for k in OUTPUT_KEYS}
        else:
            local = {
                "embeddings": torch.zeros(0, dim),
                "labels": torch.zeros(0, dtype=torch.int64),
                "indices": torch.zeros(0, dtype=torch.int64),
                "is_query": torch.zeros(0, dtype=torch.bool),
                "is_gallery": torch.zeros(0, dtype=torch.bool),
            }
        self._reset()
        # Collectives run on the strategy's device (CPU for gloo, the rank's GPU for NCCL).
        dev = pl_module.device
        local = {k: v.to(dev) for k, v in local.items()}
        # gloo and NCCL both move bool tensors poorly; send the flags as uint8.
        indices, emb, labels, isq, isg = gather_by_index(
            local["indices"], local["embeddings"], local["labels"],
            local["is_query"].to(torch.uint8), local["is_gallery"].to(torch.uint8),
        )
        if indices.numel() == 0:
            raise ValueError(
                "RetrievalEvaluator: the evaluation split is empty (no batch reached the callback). Check that "
                "the datamodule's val/test dataloader yields samples and that limit_*_batches is not 0."
            )
        return {"indices": indices, "embeddings": emb, "labels": labels, "is_query": isq.bool(), "is_gallery": isg.bool()}

    def _refine(self, pl_module: L.LightningModule, data: dict[str, torch.Tensor]) -> dict[str, Any]:
        refine = getattr(pl_module, "refine", None)
        if not callable(refine):
            return {}
        with _eval_mode(pl_module):
            out = refine(data["embeddings"], data["is_query"], data["is_gallery"])
        if out is None:
            return {}
        if not isinstance(out, Mapping):
            raise TypeError(f"{type(pl_module).__name__}.refine must return a dict or None; got {type(out).__name__}.")
        n, nq = data["indices"].numel(), int(data["is_query"].sum())
        for key, value in out.items():
            if isinstance(value, RankedLists):
                if value.indices.shape[0] != nq:
                    raise ValueError(
                        f"{type(pl_module).__name__}.refine()[{key!r}] has {value.indices.shape[0]} ranked lists; "
                        f"expected one per query ({nq})."
                    )
            elif isinstance(value, torch.Tensor):
                if value.ndim != 2 or value.shape[0] != n:
                    raise ValueError(
                        f"{type(pl_module).__name__}.refine()[{key!r}] has shape {tuple(value.shape)}; expected "
                        f"({n}, D'): refined embeddings of every sample in dataset-index order."
                    )
            else:
                raise TypeError(
                    f"{type(pl_module).__name__}.refine()[{key!r}] is a {type(value).__name__}; return a Tensor "
                    "of refined embeddings or a benchmark.core.contracts.RankedLists."
                )
        return dict(out)

    def compute_metrics(
        self,
        data: dict[str, torch.Tensor],
        refined: Mapping[str, Any],
        recall_ks: Sequence[int],
        with_nmi: bool,
        device: torch.device,
    ) -> dict[str, dict[str, float]]:
        """Metrics of the plain embeddings (key ``None``) and of each refined output."""
        self._warn_if_collapsed(data["embeddings"])
        labels, isq, isg = data["labels"], data["is_query"], data["is_gallery"]
        common = {"recall_ks": recall_ks, "map_at_k": self.map_at_k}

        def of_embeddings(emb: torch.Tensor) -> dict[str, float]:
            out = retrieval_metrics(emb, labels, isq, isg, chunk_size=self.chunk_size, device=device, **common)
            if with_nmi:
                out["NMI"] = nmi(emb.to(device), labels, seed=self.nmi_seed)
            return out

        results: dict[str, dict[str, float]] = {"": of_embeddings(data["embeddings"])}
        for key, value in refined.items():
            name = f"refined/{key}" if key else "refined"
            if isinstance(value, RankedLists):
                results[name] = ranked_list_metrics(value.indices.to(device), labels.to(device), isq, isg, **common)
            else:
                results[name] = of_embeddings(value.detach().float())
        return results

    def _warn_if_collapsed(self, embeddings: torch.Tensor) -> None:
        """Warn once per evaluator when many embeddings are identical (a collapsed model).

        Identical embeddings tie on every score; the metrics stay exact (ties go to the lower
        dataset index) but mean nothing, and the cause is almost always the training run.
        """

        if self._collapse_warned:
            return
        total = int(embeddings.shape[0])
        duplicates = count_duplicate_rows(embeddings)
        if duplicates > self.collapse_fraction * total:
            self._collapse_warned = True
            warnings.warn(
                f"RetrievalEvaluator: the embeddings have collapsed: {duplicates} of {total} rows are equal to an "
                "earlier row; this is almost always a training failure (learning rate too high, diverged run, "
                "dead head). The metrics rank tied scores by dataset index.",
                UserWarning,
                stacklevel=2,
            )

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        start = time.perf_counter()
        self.last_embed_seconds = start - self._epoch_start if self._epoch_start is not None else 0.0
        data = self._gather(pl_module)
        refined = {}
        if stage == "test" or self.refine_on_validation:
            refined = self._refine(pl_module, data)
        results: dict[str, dict[str, float]] | None = None
        if trainer.is_global_zero:
            results = self.compute_metrics(
                data, refined, self.resolved_recall_ks(trainer), self.resolved_nmi(trainer), self._device(pl_module)
            )
        results = trainer.strategy.broadcast(results, src=0)  # identical values on every rank
        run_dir = self.run_dir(trainer)  # a collective (trainer.log_dir broadcasts): every rank calls it
        flat = {
            f"{stage}/{group + '/' if group else ''}{name}": float(value)
            for group, metrics in results.items()
            for name, value in metrics.items()
        }
        self.last_metrics = flat
        with warnings.catch_warnings():  # the values are identical on every rank by construction
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            for name, value in flat.items():
                pl_module.log(name, value, sync_dist=False, prog_bar=name == f"{stage}/R@1")
            # The x-axis every chart shares (benchmark.core.results.epochs_trained): 0 before training.
            checkpoint = self._evaluated_checkpoint(trainer) if stage == "test" else None
            pl_module.log(f"{stage}/epochs_trained", self._epochs_trained(trainer, checkpoint), sync_dist=False)
        if trainer.is_global_zero:
            if self.write_results:
                self._write(trainer, pl_module, run_dir / f"metrics_{stage}.json", stage, results, time.perf_counter() - start)
            if stage == "test" and self.print_table:
                print_metrics_table(results, title=self._title(trainer, pl_module))
            if stage in self.keep_stages:
                self.last_evaluation = self._keep(trainer, stage, data, refined, results)
                self.last_evaluation.seconds = self.last_embed_seconds + time.perf_counter() - start

    def _keep(
        self, trainer: L.Trainer, stage: str, data: dict[str, torch.Tensor], refined: Mapping[str, Any],
        results: dict[str, dict[str, float]],
    ) -> Evaluation:
        """The evaluation just scored, on the CPU (refined embeddings detached, ranked lists as given)."""
        cpu = {k: v.detach().cpu() for k, v in data.items()}
        kept = {
            key: (RankedLists(value.indices.cpu()) if isinstance(value, RankedLists) else value.detach().float().cpu())
            for key, value in refined.items()
        }
        return Evaluation(
            stage, cpu["embeddings"], cpu["labels"], cpu["indices"], cpu["is_query"], cpu["is_gallery"], kept, results,
            int(trainer.current_epoch), int(trainer.global_step), self.resolved_recall_ks(trainer),
        )

    # ------------------------------------------------------------------ records
    @staticmethod
    def _describe(obj: Any) -> dict[str, Any]:
        describe = getattr(obj, "describe", None)
        return dict(describe()) if callable(describe) else {}

    def _title(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        meta = {**self._describe(getattr(trainer, "datamodule", None)), **self._describe(pl_module)}
        parts = [str(meta[k]) for k in ("method", "backbone", "dataset", "protocol") if meta.get(k)]
        return "Test metrics" + (f": {' / '.join(parts)}" if parts else "")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Remember what a restored checkpoint is (its epoch, step and how it was selected)."""
        self._checkpoint_meta = {
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
            "best": [
                {"monitor": state.get("monitor"), "path": state.get("best_model_path"), "score": state.get("best_model_score")}
                for key, state in (checkpoint.get("callbacks") or {}).items()
                if str(key).startswith("ModelCheckpoint") and isinstance(state, Mapping) and state.get("monitor")
            ],
        }

    def _evaluated_checkpoint(self, trainer: L.Trainer) -> dict[str, Any]:
        """Which weights were evaluated: a checkpoint file (path, epoch, step, selection) or the
        weights in memory at the current epoch and step."""
        path = getattr(trainer, "ckpt_path", None)
        if not path:
            return {"path": None, "epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
                    "selected_by": "the weights in memory (end of training or the current step)"}
        meta = getattr(self, "_checkpoint_meta", None) or {}
        info: dict[str, Any] = {"path": str(path), "epoch": meta.get("epoch"), "global_step": meta.get("global_step")}
        selected = "given checkpoint"
        live = trainer.checkpoint_callback
        for best in meta.get("best", []):
            if best["path"] and Path(best["path"]).name == Path(path).name:
                selected = f"best {best['monitor']} ({best['score']:.6g})" if best["score"] is not None else f"best {best['monitor']}"
        if live is not None and getattr(live, "best_model_path", "") and Path(live.best_model_path) == Path(path):
            score = live.best_model_score
            selected = f"best {live.monitor}" + (f" ({float(score):.6g})" if score is not None else "")
        elif Path(path).name == "last.ckpt" and selected == "given checkpoint":
            selected = "last checkpoint"
        info["selected_by"] = selected
        return info

    @staticmethod
    def run_dir(trainer: L.Trainer) -> Path:
        """``trainer.log_dir`` (the logger's folder) or ``trainer.default_root_dir``.

        ``trainer.log_dir`` broadcasts from rank 0, so every rank must call this.
        """
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        path: Path,
        stage: str,
        results: dict[str, dict[str, float]],
        seconds: float,
    ) -> None:
        history = self._history.setdefault(stage, [])
        if not history and path.exists():  # continue the record of an earlier process in this run
            with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
                previous = json.loads(path.read_text())
                history.extend(previous["evaluations"])
                if final_evaluation(previous) is not None:
                    self._previous_meta = {k: v for k, v in previous.items() if k not in ("evaluations", "metrics", "refined")}
        checkpoint = self._evaluated_checkpoint(trainer) if stage == "test" else None
        role = self._role(checkpoint) if stage == "test" else None
        entry = {
            "stage": stage,
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "epochs_trained": self._epochs_trained(trainer, checkpoint),
            "seconds": round(seconds, 3),  # gather, refine, metrics
            "embed_seconds": round(self.last_embed_seconds, 3),  # the loop that embedded the split
            **({"checkpoint": checkpoint, "role": role, "selected_on": self._selected_on(trainer, checkpoint)}
               if stage == "test" else {}),  # fmt: skip
            "metrics": results[""],
            **({"refined": {k: v for k, v in results.items() if k}} if len(results) > 1 else {}),
        }
        history.append(entry)
        if stage == "test" and role != ROLE_FINAL and self._previous_meta:
            # A later test of some checkpoint adds its entry; the run's description and its headline
            # numbers stay those of the end of training (the final evaluation).
            payload = dict(self._previous_meta)
        else:
            meta = {**self._describe(getattr(trainer, "datamodule", None)), **self._describe(pl_module)}
            seed = os.environ.get("PL_GLOBAL_SEED")
            payload = {
                "stage": stage,
                "split": meta.pop(f"{stage}_split", None) or meta.pop("split", None) or stage,
                **meta,
                "seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed,
                "precision": str(trainer.precision),
                **getattr(trainer, "run_metadata", {}),  # configuration, comparison key, training length (the CLI's)
                **({"checkpoint": checkpoint} if stage == "test" else {}),
                "recall_ks": list(self.resolved_recall_ks(trainer)),
                "map_at_k": self.map_at_k,
                "nmi": self.resolved_nmi(trainer),
                "versions": library_versions(),
            }
        # The headline numbers (top-level "metrics"): the final evaluation's, once there is one.
        final = final_evaluation({"evaluations": history}) if stage == "test" else None
        headline = final if final is not None else entry
        payload["metrics"] = headline["metrics"]
        if "refined" in headline:
            payload["refined"] = headline["refined"]
        payload["evaluations"] = history
        _write_json_atomic(path, payload)

    def _role(self, checkpoint: Mapping[str, Any] | None) -> str:
        """``final`` for the end-of-training test, ``checkpoint`` for a test of a given checkpoint."""
        if self.test_role is not None:
            return self.test_role
        return ROLE_CHECKPOINT if checkpoint and checkpoint.get("path") else ROLE_FINAL

    @staticmethod
    def _selected_on(trainer: L.Trainer, checkpoint: Mapping[str, Any] | None) -> str | None:
        """The split whose metric chose the evaluated weights: ``test`` when a best checkpoint was kept by
        a validation on the test split (the paper protocol), ``holdout`` under the holdout protocol, None
        for weights that were not chosen by any metric (the end of training, ``last.ckpt``)."""
        if not checkpoint or not str(checkpoint.get("selected_by", "")).startswith("best"):
            return None
        dm = getattr(trainer, "datamodule", None)
        split = (dm.describe() if callable(getattr(dm, "describe", None)) else {}).get("val_split")
        return SELECTED_ON_TEST if split == "test" else SELECTED_ON_HOLDOUT if split == "holdout" else None

    @staticmethod
    def _epochs_trained(trainer: L.Trainer, checkpoint: Mapping[str, Any] | None) -> float:
        """Training epochs completed by the evaluated weights (``benchmark.core.results.epochs_trained``):
        0 before training, ``e + 1`` after the 0-based epoch ``e``, a fraction inside an epoch."""
        if checkpoint is not None and checkpoint.get("path"):  # a checkpoint file: its own step and epoch
            step, epoch = int(checkpoint.get("global_step") or 0), int(checkpoint.get("epoch") or 0)
            per_epoch = checkpoint.get("steps_per_epoch")
            if step <= 0:
                return 0.0
            return round(step / per_epoch, 4) if per_epoch else float(epoch + 1)
        if int(trainer.global_step) <= 0:
            return 0.0
        loop = trainer.fit_loop
        batches = trainer.num_training_batches
        if trainer.training or trainer.state.fn == "fit":
            done = loop.epoch_loop.batch_progress.current.completed
            if isinstance(batches, int) and batches > 0 and 0 < done < batches:
                return round(trainer.current_epoch + done / batches, 4)
            return float(trainer.current_epoch + 1)
        return float(trainer.current_epoch)  # after fit: the fit loop counted every finished epoch


def print_metrics_table(results: Mapping[str, Mapping[str, float]], title: str = "Test metrics") -> None:
    """A rich table: one row per metric, one column for the plain and each refined result."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    groups = list(results)
    for group in groups:
        table.add_column(group or "embeddings", justify="right")
    names = list(dict.fromkeys(name for metrics in results.values() for name in metrics))
    for name in names:
        cells = []
        for group in groups:
            value = results[group].get(name)
            if value is None:
                cells.append("")
            elif name.startswith(("num_", "queries_")):
                cells.append(f"{int(value):d}")
            else:
                cells.append(f"{100.0 * value:.2f}")
        table.add_row(name, *cells)
    table.caption = "percent; counts as integers"
    console().print(table)
