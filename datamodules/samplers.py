"""Training batch samplers: class-balanced (n classes x m images) and plain shuffled batches.

Both are *batch* samplers (``DataLoader(batch_sampler=...)``) that draw a new sequence of
batches every epoch, deterministically from ``(seed, epoch, rank)``.

How the epoch reaches them. Lightning calls ``set_epoch`` on ``loader.sampler`` and on
``loader.batch_sampler.sampler`` before every epoch, never on the batch sampler itself, so a
``set_epoch`` method on a batch sampler alone is never called and every epoch would replay
the same batches. These samplers therefore expose their epoch state as ``.sampler`` (the
attribute Lightning reaches, as on ``torch.utils.data.BatchSampler``). And so that a loop
which never calls ``set_epoch`` (plain PyTorch, another framework) does not replay epoch 0
forever either, a second pass over the sampler without an intervening ``set_epoch`` moves
on to the next epoch by itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from benchmark.core.errors import ConfigError
from benchmark.core.validation import check_all, check_choice, require


def _dist_info(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
    return num_replicas, rank


class EpochState:
    """The epoch a batch sampler draws next; Lightning sets it via ``batch_sampler.sampler.set_epoch``."""

    def __init__(self) -> None:
        self.epoch = 0
        self.fresh = True  # set_epoch was called since the last pass began

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.fresh = int(epoch), True

    def begin_pass(self) -> int:
        """The epoch of the pass that starts now (advances by one if nobody set it)."""
        if not self.fresh:
            self.epoch += 1
        self.fresh = False
        return self.epoch


class EpochBatchSampler(Sampler[list[int]]):
    """Shared machinery: seed, rank, epoch state and a fixed number of batches per epoch.

    Subclasses implement :meth:`batches` for one epoch given its random generator.
    """

    def __init__(
        self, batches_per_epoch: int, seed: int = 0, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        require(batches_per_epoch >= 1, "data.batches_per_epoch", ">= 1", batches_per_epoch)
        self.num_replicas, self.rank = _dist_info(num_replicas, rank)
        self.batches_per_epoch = int(batches_per_epoch)
        self.seed = int(seed)
        self.sampler = EpochState()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch (an upper bound where the epoch length varies: a shorter epoch ends
        when its batches run out, which Lightning's loop handles as the epoch's end)."""
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.sampler.begin_pass()
        yield from self.batches(epoch)

    def batches(self, epoch: int) -> Iterator[list[int]]:
        raise NotImplementedError


EpochLength = Literal["images", "combine"]


def batch_splits(batch_size: int) -> list[tuple[int, int]]:
    """Every (classes, images per class) split of ``batch_size`` with at least 2 of each: the
    choices of the official Intra-Batch code's ``NumberSampler`` (54 -> (2, 27) ... (27, 2))."""
    return [(n, batch_size // n) for n in range(2, batch_size // 2 + 1) if batch_size % n == 0]


def combine_sampler_batches(class_sizes: np.ndarray, classes_per_batch: int, samples_per_class: int) -> int:
    """Batches per epoch of the official Intra-Batch ``CombineSampler`` (combine_sampler.py).

    It pads every class of s images to max(s, m), splits it into chunks of m after adding
    images until the count is the next multiple of m strictly above (a class whose size is a
    multiple of m gets one extra chunk), so a class gives ``max(s, m) // m + 1`` chunks; the
    shuffled chunks are then padded to a multiple of n and cut into batches of n chunks:
    ``ceil(sum_c (max(s_c, m) // m + 1) / n)``. SOP at 15 x 6 gives 1,511 (against 661 for
    one pass over the images), In-Shop at 14 x 4 gives 659.
    """
    sizes = np.maximum(np.asarray(class_sizes, dtype=np.int64), samples_per_class)
    chunks = int((sizes // samples_per_class + 1).sum())
    return -(-chunks // classes_per_batch)


class ClassBalancedBatchSampler(EpochBatchSampler):
    """Yields batches of ``classes_per_batch`` distinct classes x ``samples_per_class`` images.

    Epoch length (``epoch_length``): ``images`` visits every class about
    ``len(labels) / (n * m)`` times per epoch, so that an epoch sees roughly as many images as
    the training split holds; ``combine`` has as many batches as the official Intra-Batch
    ``CombineSampler`` (:func:`combine_sampler_batches`, more batches than one pass on datasets
    of small classes: SOP 2.3x); ``batches_per_epoch`` overrides both. Within an epoch, classes
    are drawn without replacement from a shuffled pool that is refilled when exhausted, so all
    classes appear equally often.

    ``random_split``: every epoch draws its own (n, m) split of the batch size n * m among
    :func:`batch_splits`, as the official CUB recipe's ``NumberSampler`` does (the draw is the
    same on every rank; with ``combine`` the epoch length follows the split, and ``len()`` is
    the longest).

    Images within a class: each class keeps its own shuffled queue of its images, carried
    across the epoch's visits, so a class with more than m images shows all of them before
    any repeats (over an epoch, every image of a visited class is drawn); a class with
    fewer than ``samples_per_class`` images repeats some of them to fill its slot (sampling
    with replacement), unless ``min_samples`` excludes it. Classes with a single image
    then give exact duplicates, which losses treat as positives; ``min_samples=2`` drops them.

    Determinism: batches depend only on (seed, epoch, rank). Under DDP each rank draws its
    own batches from a rank-specific stream, so ranks see different classes in a step and
    the per-rank batch keeps its n x m composition (the global batch is world_size x n x m).
    """

    def __init__(
        self,
        labels: np.ndarray,
        classes_per_batch: int,
        samples_per_class: int,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        min_samples: int = 1,
        num_replicas: int | None = None,
        rank: int | None = None,
        epoch_length: EpochLength = "images",
        random_split: bool = False,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        check_all([("data.classes_per_batch", classes_per_batch, classes_per_batch >= 1, ">= 1"),
                   ("data.samples_per_class", samples_per_class, samples_per_class >= 1, ">= 1")])
        check_choice("data.epoch_length", epoch_length, EpochLength)
        order = np.argsort(labels, kind="stable")
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        keep = counts >= min_samples
        # Per class: the dataset indices of its samples (contiguous slices of ``order``).
        self._members = [order[s : s + c] for s, c, k in zip(starts, counts, keep) if k]
        self.classes = classes[keep]
        self.n, self.m = classes_per_batch, samples_per_class
        self.splits = batch_splits(self.n * self.m) if random_split else [(self.n, self.m)]
        if not self.splits:
            raise ConfigError(
                f"--data.random_split needs a batch size with a split of >= 2 classes x >= 2 images; "
                f"{self.n} x {self.m} = {self.n * self.m} has none."
            )
        widest = max(n for n, _ in self.splits)
        if len(self.classes) < widest:
            raise ConfigError(
                f"The training split has {len(self.classes)} classes with >= {min_samples} images, "
                f"fewer than classes_per_batch={widest}{' (the widest random split)' if random_split else ''}. "
                "Lower --data.classes_per_batch."
            )
        self.epoch_length: EpochLength = epoch_length
        self._fixed = batches_per_epoch
        self._sizes = counts[keep]
        self._world = _dist_info(num_replicas, rank)[0]
        longest = max(self._epoch_batches(n, m) for n, m in self.splits)
        super().__init__(longest, seed, num_replicas, rank)

    def _epoch_batches(self, n: int, m: int) -> int:
        """Batches per rank in an epoch drawn with the split n x m."""
        if self._fixed is not None:
            return int(self._fixed)
        if self.epoch_length == "combine":
            return max(1, -(-combine_sampler_batches(self._sizes, n, m) // self._world))
        return max(1, int(self._sizes.sum()) // (n * m * self._world))

    def split(self, epoch: int) -> tuple[int, int]:
        """The (classes, images per class) split of ``epoch`` (the same on every rank)."""
        if len(self.splits) == 1:
            return self.splits[0]
        return self.splits[int(np.random.default_rng([self.seed, epoch, len(self.splits)]).integers(len(self.splits)))]

    def batches(self, epoch: int) -> Iterator[list[int]]:
        n, m = self.split(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        num_classes = len(self.classes)
        pool: list[int] = []
        queues: dict[int, list[int]] = {}  # class -> its images not yet drawn this epoch
        for _ in range(self._epoch_batches(n, m)):
            if len(pool) < n:
                # Refill with a fresh permutation; avoid repeating a class inside one batch.
                fresh = [c for c in rng.permutation(num_classes).tolist() if c not in pool]
                pool = pool + fresh
            chosen, pool = pool[:n], pool[n:]
            batch: list[int] = []
            for c in chosen:
                members = self._members[c]
                if len(members) < m:  # too few images: repeat some of them
                    batch.extend(rng.choice(members, size=m, replace=True).tolist())
                    continue
                queue = queues.get(c, [])
                if len(queue) < m:  # refill with a new permutation, no image twice in a slot
                    fresh = [i for i in rng.permutation(members).tolist() if i not in queue]
                    queue = queue + fresh
                batch.extend(queue[:m])
                queues[c] = queue[m:]
            yield batch


class ShuffledBatchSampler(EpochBatchSampler):
    """Plain random batches of ``batch_size`` images (no class structure).

    Every epoch shuffles the whole split with a generator shared by all ranks; rank ``r``
    takes every ``num_replicas``-th image of that order (as ``DistributedSampler`` does), so
    the ranks' batches are disjoint. An epoch has ``batches_per_epoch`` batches (default:
    one pass, ``len(indices) // (batch_size * num_replicas)``); a longer epoch continues
    with the next shuffle, a shorter one stops early.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        require(batch_size >= 1, "data.batch_size", ">= 1", batch_size)
        world = _dist_info(num_replicas, rank)[0]
        if num_samples < batch_size * world:
            raise ConfigError(
                f"The training set has {num_samples} images, fewer than one batch of {batch_size} per process "
                f"({world} process(es)). Lower the batch size (classes_per_batch * samples_per_class)."
            )
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        per_rank = num_samples // (batch_size * world)
        super().__init__(batches_per_epoch if batches_per_epoch is not None else per_rank, seed, num_replicas, rank)

    def batches(self, epoch: int) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])  # the same order on every rank
        per_pass = self.num_samples // (self.batch_size * self.num_replicas)
        produced = 0
        while produced < self.batches_per_epoch:
            mine = rng.permutation(self.num_samples)[self.rank :: self.num_replicas]  # this rank's share
            for b in range(min(per_pass, self.batches_per_epoch - produced)):
                yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()
                produced += 1
