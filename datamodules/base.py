"""The one LightningDataModule every dataset and every method shares.

A subclass only says how to read its official on-disk layout (:meth:`read_records`); this
base turns the records into datasets, class-balanced training batches, evaluation splits
with query/gallery flags, and the `paper` / `holdout` protocols.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from benchmark.core.contracts import DataRequest
from benchmark.core.errors import ConfigError
from benchmark.core.io import atomic_write_text, default_data_root
from benchmark.core.validation import check_choice
from datamodules.records import DatasetError, DatasetRecords, SplitRecords
from datamodules.samplers import (
    ClassBalancedBatchSampler,
    EpochBatchSampler,
    EpochLength,
    ShuffledBatchSampler,
)
from datamodules.transforms import AugmentConfig, EvalResize, eval_transform, train_transform

Protocol = Literal["paper", "holdout"]
Decoder = Literal["pil", "torchvision"]
# torchvision decodes the same pixels as PIL (both are libjpeg-turbo) 1.2-1.5x faster, and its
# uint8 tensors make the transforms about 2x faster than PIL images do (docs/performance.md).
DEFAULT_DECODER: Decoder = "torchvision"

# torchvision 0.29 marks its image decoders deprecated in favour of torchcodec and warns on every
# call; pyproject pins torchvision < 0.30, so the warning is noise a user cannot act on. Silenced
# around the call (not at import: a library module leaves the process's warning filters alone).
_DECODER_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


class ImageDataset(Dataset):
    """Images of one split as dicts: image, label, index (+ query/gallery flags).

    ``decoder`` chooses how a file becomes pixels: ``pil`` (a PIL RGB image) or
    ``torchvision`` (``torchvision.io.decode_image``: a (3, H, W) uint8 tensor, the same pixels,
    faster; formats it cannot read fall back to PIL). The transforms accept both.
    """

    def __init__(
        self,
        records: SplitRecords,
        transform,
        indices: np.ndarray | None = None,
        load_images: bool = True,
        decoder: Decoder = DEFAULT_DECODER,
    ) -> None:
        self.records, self.transform, self.load_images = records, transform, load_images
        self.decoder: Decoder = check_choice("--data.decoder", decoder, Decoder)
        self.indices = np.arange(len(records)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        idx = int(self.indices[i])
        item = {
            "label": int(self.records.labels[idx]),
            "index": idx,
            "is_query": bool(self.records.is_query[idx]),
            "is_gallery": bool(self.records.is_gallery[idx]),
        }
        if self.load_images:
            item["image"] = self.transform(self._load(idx))
        return item

    def _load(self, idx: int) -> Image.Image | torch.Tensor:
        path = self.records.paths[idx]
        if self.decoder == "torchvision":
            image = decode_tensor(path)
            if image is not None:
                return image
        return decode_pil(path)


def decode_pil(path: str) -> Image.Image:
    """``path`` as an RGB PIL image; a corrupt or truncated file raises :class:`DatasetError`."""
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"Cannot decode image {path}: {err}. The file is corrupt or truncated; "
            "re-extract it from the dataset's original archive."
        ) from err
    return image


def decode_tensor(path: str) -> torch.Tensor | None:
    """``path`` as a (3, H, W) uint8 RGB tensor (grayscale, CMYK, palette, alpha converted), or
    ``None`` when torchvision cannot decode it (another format, or a damaged file: the caller
    then decodes with PIL, which reads the other formats and raises the usual error).

    A 16-bit PNG is scaled to 8 bits here; PIL's ``convert("RGB")`` clips it instead (none of
    the four datasets has one)."""
    try:
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)  # (bytes,)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DECODER_DEPRECATION, category=DeprecationWarning)
            image = decode_image(data, mode=ImageReadMode.RGB)  # (3, H, W)
    except (OSError, RuntimeError, ValueError):
        return None
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = to_dtype(image, torch.uint8, scale=True)
    return image


def _check_image(path: str) -> str | None:
    """Cheap integrity check: the header parses and the file ends with its format's end marker."""
    try:
        with Image.open(path) as im:
            fmt = im.format
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 12))
            tail = f.read()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated (no JPEG end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated (no PNG IEND chunk)"
    return None


class RetrievalDataModule(L.LightningDataModule):
    """Shared base: readers -> splits -> transforms -> loaders.

    Args:
        root: dataset folder (the layout each subclass documents); ``None`` uses
            ``$DML_BENCHMARK_DATA/<name>``.
        image_size: training crop and evaluation center-crop size in pixels.
        classes_per_batch: n, distinct classes in a training batch.
        samples_per_class: m, images per class in a training batch (batch = n * m per rank).
        batches_per_epoch: fixed epoch length; ``None`` = ``epoch_length``.
        epoch_length: the epoch length of class-balanced batches without ``batches_per_epoch``:
            ``images`` (about one pass over the images) or ``combine`` (as many batches as the
            official Intra-Batch ``CombineSampler``: every class padded to whole chunks of m
            plus one chunk; see :func:`datamodules.samplers.combine_sampler_batches`).
        random_batch_split: draw a new (classes x images per class) split of the batch size
            every epoch, as the official Intra-Batch CUB recipe's ``NumberSampler`` does.
        eval_batch_size: batch size of the evaluation loaders.
        num_workers: loader worker processes (``None``: ``min(8, cpu count)``).
        protocol: ``paper`` evaluates the test split during training (as the published
            tables do); ``holdout`` carves ``val_fraction`` of the training classes as a
            class-disjoint validation split for model selection and tests once at the end.
        val_fraction: share of training classes held out under ``holdout``.
        split_seed: seed of the holdout class choice (kept apart from the training seed so
            that every run of a sweep validates on the same classes).
        seed: seed of the training batches (which classes and images form each batch);
            ``None`` (default) follows the run's seed (``--seed_everything``), so that a
            seed sweep varies the batches as well as the initialisation. Set it to fix the
            batch sequence across model seeds. The value used is recorded as ``data_seed``.
        augment: training augmentation strength.
        eval_crop_pct: evaluation resize = image_size / eval_crop_pct, then center crop.
        eval_resize: ``shorter`` resizes the short side (aspect ratio kept; the usual protocol),
            ``square`` squashes to a square before the crop (Context-Refine's stage 1).
        verify_images: ``header`` checks that every listed image exists, parses and is not
            truncated before training (cached); ``exists`` only checks existence; ``none``
            skips checks.
        decoder: how image files are decoded: ``torchvision`` (default;
            ``torchvision.io.decode_image`` to uint8 tensors, with the transforms on tensors) or
            ``pil`` (PIL images, the transforms on PIL). Both give the same pixels from
            libjpeg-turbo; ``torchvision`` is about 2x faster per loader worker for decode +
            training transform (``python -m benchmark perf data``, docs/performance.md).
    """

    name: ClassVar[str] = ""
    recall_ks: ClassVar[tuple[int, ...]] = (1, 2, 4, 8)
    compute_nmi: ClassVar[bool] = True

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        classes_per_batch: int = 32,
        samples_per_class: int = 4,
        batches_per_epoch: int | None = None,
        epoch_length: EpochLength = "images",
        random_batch_split: bool = False,
        eval_batch_size: int = 256,
        num_workers: int | None = None,
        protocol: Protocol = "paper",
        val_fraction: float = 0.2,
        split_seed: int = 0,
        seed: int | None = None,
        augment: AugmentConfig = AugmentConfig(),
        eval_crop_pct: float = 0.875,
        eval_resize: EvalResize = "shorter",
        verify_images: Literal["header", "exists", "none"] = "header",
        decoder: Decoder = DEFAULT_DECODER,
    ) -> None:
        super().__init__()
        if protocol not in ("paper", "holdout"):
            raise ConfigError(f"protocol must be 'paper' or 'holdout', got {protocol!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
        bad = [
            f"{name}={value} (must be {rule})"
            for name, value, ok, rule in (
                ("image_size", image_size, image_size >= 1, ">= 1"),
                ("classes_per_batch", classes_per_batch, classes_per_batch >= 1, ">= 1"),
                ("samples_per_class", samples_per_class, samples_per_class >= 1, ">= 1"),
                ("batches_per_epoch", batches_per_epoch, batches_per_epoch is None or batches_per_epoch >= 1, ">= 1 or null"),
                ("eval_batch_size", eval_batch_size, eval_batch_size >= 1, ">= 1"),
                ("num_workers", num_workers, num_workers is None or num_workers >= 0, ">= 0 or null"),
            )
            if not ok
        ]
        if bad:
            raise ConfigError(f"{type(self).__name__}: {'; '.join(bad)}. Set --data.<name> to a valid value.")
        self.root = Path(root).expanduser() if root is not None else default_data_root() / self.name
        self.image_size = image_size
        self.classes_per_batch, self.samples_per_class = classes_per_batch, samples_per_class
        self.batches_per_epoch = batches_per_epoch
        self.epoch_length: EpochLength = check_choice("--data.epoch_length", epoch_length, EpochLength)
        self.random_batch_split = random_batch_split
        self.eval_batch_size = eval_batch_size
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.protocol: Protocol = protocol
        self.val_fraction, self.split_seed, self.seed = val_fraction, split_seed, seed
        self.augment, self.eval_crop_pct, self.verify_images = augment, eval_crop_pct, verify_images
        self.decoder: Decoder = check_choice("--data.decoder", decoder, Decoder)
        self.eval_resize: EvalResize = check_choice("--data.eval_resize", eval_resize, EvalResize)
        self.request = DataRequest()
        self._splits: dict[str, SplitRecords] | None = None
        self._train_sampler: EpochBatchSampler | None = None

    # ------------------------------------------------------------------ reading
    def read_records(self, root: Path) -> DatasetRecords:
        """Parse the official lists under ``root`` (no image is opened here)."""
        raise NotImplementedError(f"{type(self).__name__} must implement read_records(root)")

    def prepare_records(self) -> None:
        """Hook for datasets that must be created first (the embedded synthetic default)."""

    def _load(self) -> dict[str, SplitRecords]:
        if self._splits is not None:
            return self._splits
        self.prepare_records()
        records = self.read_records(self.root)
        self._check_sizes(records)
        for split_name, split in (("train", records.train), ("test", records.test)):
            if len(split) == 0:
                raise DatasetError(f"{self.name}: the {split_name} split under {self.root} is empty.")
        if not records.test.is_query.any() or not records.test.is_gallery.any():
            raise DatasetError(f"{self.name}: the test split has no queries or no gallery images.")
        self._verify(records)
        train, test = records.train, records.test
        splits = {"test": test}
        if self.protocol == "holdout":
            splits["train"], splits["val"] = self._holdout(train)
        else:
            splits["train"], splits["val"] = train, test
        self._splits = splits
        return splits

    def _holdout(self, train: SplitRecords) -> tuple[SplitRecords, SplitRecords]:
        """Carve a class-disjoint validation split from the training classes."""
        num_classes = train.num_classes
        num_val = max(1, int(round(self.val_fraction * num_classes)))
        if num_val >= num_classes:
            raise DatasetError(f"{self.name}: val_fraction={self.val_fraction} leaves no training classes.")
        rng = np.random.default_rng(self.split_seed)
        val_classes = np.zeros(num_classes, dtype=bool)
        val_classes[rng.choice(num_classes, size=num_val, replace=False)] = True
        in_val = val_classes[train.labels]  # (N,) bool
        return train.subset(np.flatnonzero(~in_val)), train.subset(np.flatnonzero(in_val))

    def _check_sizes(self, records: DatasetRecords) -> None:
        found = {"train": len(records.train), "test": len(records.test)}
        found["query"] = int(records.test.is_query.sum())
        found["gallery"] = int(records.test.is_gallery.sum())
        diffs = [
            f"{k}: {found[k]} (published {v})" for k, v in records.expected_sizes.items() if k in found and found[k] != v
        ]
        if diffs:
            warnings.warn(
                f"{self.name} at {self.root} differs from the published dataset: {', '.join(diffs)}. "
                "Results are not comparable with the papers' numbers.",
                stacklevel=2,
            )

    def _verify(self, records: DatasetRecords) -> None:
        """Fail before training if a listed image is missing or damaged (cached per file list)."""
        if self.verify_images == "none":
            return
        paths = records.train.paths + records.test.paths
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DatasetError(
                f"{self.name}: {len(missing)} listed image(s) are missing, e.g. {missing[0]}. "
                f"Re-extract the dataset under {self.root} (see docs/datasets.md for the layout)."
            )
        if self.verify_images == "exists":
            return
        digest = hashlib.sha1()
        for p in paths:
            st = os.stat(p)
            digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        stamp = default_data_root() / "verified" / f"{self.name}-{digest.hexdigest()[:20]}.json"
        if stamp.is_file():
            return
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = [(p, r) for p, r in zip(paths, pool.map(_check_image, paths, chunksize=256)) if r]
        if problems:
            listing = "\n".join(f"  {p}: {r}" for p, r in problems[:10])
            raise DatasetError(
                f"{self.name}: {len(problems)} image(s) are corrupt or truncated:\n{listing}\n"
                "Re-extract them from the original archive (or pass verify_images='exists' to skip the check)."
            )
        atomic_write_text(stamp, json.dumps({"dataset": self.name, "root": str(self.root), "images": len(paths)}))

    # ------------------------------------------------------------------ derived values
    @property
    def train_records(self) -> SplitRecords:
        return self._load()["train"]

    @property
    def val_records(self) -> SplitRecords:
        return self._load()["val"]

    @property
    def test_records(self) -> SplitRecords:
        return self._load()["test"]

    @property
    def num_train_classes(self) -> int:
        """Classes the training loss sees (flows into the method's classifier heads)."""
        return self.train_records.num_classes

    @property
    def data_seed(self) -> int:
        """The seed of the training batches: ``seed``, else the run's global seed (0 if none)."""
        if self.seed is not None:
            return int(self.seed)
        global_seed = os.environ.get("PL_GLOBAL_SEED", "0")  # set by lightning's seed_everything
        return int(global_seed) if global_seed.lstrip("-").isdigit() else 0

    def describe(self) -> dict[str, Any]:
        """Flat metadata recorded with every result."""
        return {
            "dataset": self.name,
            "protocol": self.protocol,
            # What the validation during training evaluates: the test split itself under the paper
            # protocol (recorded as the split of metrics_val.json), held-out training classes otherwise.
            "val_split": "test" if self.protocol == "paper" else "holdout",
            "image_size": self.image_size,
            "classes_per_batch": self.classes_per_batch,
            "samples_per_class": self.samples_per_class,
            "sampler": self.request.sampler,
            "epoch_length": self.batches_per_epoch or self.epoch_length,
            "random_batch_split": self.random_batch_split,
            "data_seed": self.data_seed,
            "num_train_classes": self.num_train_classes,
            "num_train_images": len(self.train_records),
            "num_test_images": len(self.test_records),
        }

    # ------------------------------------------------------------------ requests from the method
    def apply_request(self, request: DataRequest) -> None:
        """Adopt the method's data needs (normalisation, views, training subset, sampler)."""
        self.request = replace(request)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        self.prepare_records()

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_transform(self):
        return train_transform(self.image_size, self.request.normalization, self.augment, self.request.views)

    def eval_transform(self):
        return eval_transform(self.image_size, self.request.normalization, self.eval_crop_pct, self.eval_resize)

    def training_batches(self, request: DataRequest | None = None) -> EpochBatchSampler:
        """The batch sampler of the training split under ``request`` (labels only, no images).

        Building it checks the batch settings against the data (enough classes for
        ``classes_per_batch``, enough images for one batch), so a command line can call it
        before any data pass.
        """
        request = self.request if request is None else request
        records = self.train_records
        positions = np.arange(len(records)) if request.train_indices is None else np.asarray(request.train_indices)
        world, rank = self._world()
        if request.sampler == "balanced" and self.samples_per_class < request.min_samples_per_class:
            raise ConfigError(
                f"--data.samples_per_class {self.samples_per_class}: this method's loss learns from pairs of images of "
                f"one class, and a batch with fewer than {request.min_samples_per_class} images per class holds no such "
                f"pair (the loss would be 0 at every step). Pass --data.samples_per_class "
                f"{request.min_samples_per_class} or more."
            )
        try:
            if request.sampler == "balanced":
                return ClassBalancedBatchSampler(
                    records.labels[positions], self.classes_per_batch, self.samples_per_class, self.batches_per_epoch,
                    seed=self.data_seed, num_replicas=world, rank=rank, epoch_length=self.epoch_length,
                    random_split=self.random_batch_split,
                )
            return ShuffledBatchSampler(
                len(positions), self.classes_per_batch * self.samples_per_class, self.batches_per_epoch,
                seed=self.data_seed, num_replicas=world, rank=rank,
            )
        except ValueError as err:
            raise ConfigError(
                f"{self.name or type(self).__name__}: {err} (the training split has {records.num_classes} classes "
                f"and {len(positions)} images; --data.classes_per_batch {self.classes_per_batch}, "
                f"--data.samples_per_class {self.samples_per_class})."
            ) from None

    def train_dataloader(self) -> DataLoader:
        """Training batches that change every epoch (see :mod:`datamodules.samplers`).

        ``balanced``: n classes x m images per batch; ``shuffle``: plain random batches of
        n * m images. Both honour ``batches_per_epoch`` and draw per-rank batches under DDP.
        """
        subset = self.request.train_indices
        dataset = ImageDataset(
            self.train_records, self.train_transform(), subset, load_images=self.request.load_images,
            decoder=self.decoder,
        )
        self._train_sampler = self.training_batches()
        return DataLoader(dataset, batch_sampler=self._train_sampler, **self._loader_kwargs())

    def image_dataset(self, records: SplitRecords, transform, **kwargs: Any) -> ImageDataset:
        """``records`` as an :class:`ImageDataset` read with this datamodule's decoder: what a
        method that builds its own loader over a split (a database, a re-ranking pass) uses."""
        return ImageDataset(records, transform, decoder=self.decoder, **kwargs)

    def eval_dataloader(self, records: SplitRecords) -> DataLoader:
        """Loader over every sample of ``records``; under DDP each rank gets a padded shard."""
        dataset = self.image_dataset(records, self.eval_transform())
        world, rank = self._world()
        sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.val_records)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.test_records)

    def state_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "split_seed": self.split_seed, "val_fraction": self.val_fraction}
