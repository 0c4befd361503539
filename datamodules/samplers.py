"""Class-balanced batch sampling (n classes x m samples per batch)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def _dist_info(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
    return num_replicas, rank


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yields batches of ``classes_per_batch`` distinct classes x ``samples_per_class`` images.

    Epoch: every class is visited about ``len(labels) / (n * m)`` times per epoch, so that an
    epoch sees roughly as many images as the training split holds (``batches_per_epoch``
    overrides this). Within an epoch, classes are drawn without replacement from a shuffled
    pool that is refilled when exhausted, so all classes appear equally often.

    Classes with fewer than ``samples_per_class`` images: their images are repeated
    (sampling with replacement) to fill the slot, unless ``min_samples`` excludes them.
    Classes with a single image then produce exact duplicates, which losses treat as
    positives; set ``min_samples=2`` to drop them instead.

    Determinism: batches depend only on (seed, epoch, rank). Under DDP each rank draws its
    own batches from a rank-specific stream, so ranks see different classes in a step and
    the per-rank batch keeps its n x m composition (the global batch is world_size x n x m).
    Call :meth:`set_epoch` each epoch (the datamodule does it).
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
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError("classes_per_batch and samples_per_class must be >= 1")
        self.num_replicas, self.rank = _dist_info(num_replicas, rank)
        order = np.argsort(labels, kind="stable")
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        keep = counts >= min_samples
        # Per class: the dataset indices of its samples (contiguous slices of ``order``).
        self._members = [order[s : s + c] for s, c, k in zip(starts, counts, keep) if k]
        self.classes = classes[keep]
        if len(self.classes) < classes_per_batch:
            raise ValueError(
                f"The training split has {len(self.classes)} classes with >= {min_samples} images, "
                f"fewer than classes_per_batch={classes_per_batch}. Lower classes_per_batch."
            )
        self.n, self.m = classes_per_batch, samples_per_class
        self.seed, self.epoch = seed, 0
        total = int(counts[keep].sum())
        per_rank = total // (self.n * self.m * self.num_replicas)
        self.batches_per_epoch = batches_per_epoch if batches_per_epoch is not None else max(1, per_rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        num_classes = len(self.classes)
        pool: list[int] = []
        for _ in range(self.batches_per_epoch):
            if len(pool) < self.n:
                # Refill with a fresh permutation; avoid repeating a class inside one batch.
                fresh = [c for c in rng.permutation(num_classes).tolist() if c not in pool]
                pool = pool + fresh
            chosen, pool = pool[: self.n], pool[self.n :]
            batch: list[int] = []
            for c in chosen:
                members = self._members[c]
                replace = len(members) < self.m
                batch.extend(rng.choice(members, size=self.m, replace=replace).tolist())
            yield batch
