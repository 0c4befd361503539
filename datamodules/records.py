"""Plain, framework-free description of a retrieval dataset on disk.

A reader turns an official on-disk layout into :class:`DatasetRecords`: lists of image
paths with class ids and query/gallery flags. Everything downstream (datasets, samplers,
the evaluation callback) works from these arrays, so a reader is the only dataset-specific
code there is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(RuntimeError):
    """A dataset cannot be used as found on disk. The message names the file and the fix."""


@dataclass
class SplitRecords:
    """One split: N images with their original class ids and retrieval roles.

    Attributes:
        paths: (N,) absolute image paths.
        labels: (N,) int64 class ids, remapped to 0..C-1 within the split (sorted by
            original id, so remapping is deterministic).
        is_query: (N,) bool, the sample is used as a query at evaluation.
        is_gallery: (N,) bool, the sample is searched by queries at evaluation.
        class_ids: (C,) the original (dataset) class id of each remapped label.
    """

    paths: list[str]
    labels: np.ndarray
    is_query: np.ndarray
    is_gallery: np.ndarray
    class_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        n = len(self.paths)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.is_query = np.asarray(self.is_query, dtype=bool)
        self.is_gallery = np.asarray(self.is_gallery, dtype=bool)
        for name in ("labels", "is_query", "is_gallery"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"SplitRecords.{name} has shape {arr.shape}, expected ({n},)")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @classmethod
    def from_original_ids(
        cls,
        paths: list[str],
        original_ids: np.ndarray,
        is_query: np.ndarray | None = None,
        is_gallery: np.ndarray | None = None,
    ) -> SplitRecords:
        """Build a split, remapping original class ids to 0..C-1 (query = gallery by default)."""
        original_ids = np.asarray(original_ids, dtype=np.int64)
        class_ids, labels = np.unique(original_ids, return_inverse=True)
        n = len(paths)
        ones = np.ones(n, dtype=bool)
        return cls(
            paths=list(paths),
            labels=labels.astype(np.int64),
            is_query=ones if is_query is None else is_query,
            is_gallery=ones.copy() if is_gallery is None else is_gallery,
            class_ids=class_ids,
        )

    def subset(self, indices: np.ndarray) -> SplitRecords:
        """The samples at ``indices`` with labels remapped again to 0..C'-1."""
        indices = np.asarray(indices, dtype=np.int64)
        return SplitRecords.from_original_ids(
            [self.paths[i] for i in indices],
            self.class_ids[self.labels[indices]] if len(self.class_ids) else self.labels[indices],
            self.is_query[indices],
            self.is_gallery[indices],
        )


@dataclass
class DatasetRecords:
    """The standard class-disjoint DML splits of one dataset."""

    name: str
    root: Path
    train: SplitRecords
    test: SplitRecords
    # Published image counts (train, test) used to warn when a local copy differs.
    expected_sizes: dict[str, int] = field(default_factory=dict)


def require_file(path: Path, dataset: str, hint: str) -> Path:
    """Return ``path`` if it is a file, else raise a :class:`DatasetError` naming it and the fix."""
    if not path.is_file():
        raise DatasetError(f"{dataset}: expected file {path} is missing. {hint}")
    return path


def require_dir(path: Path, dataset: str, hint: str) -> Path:
    """Return ``path`` if it is a directory, else raise a :class:`DatasetError`."""
    if not path.is_dir():
        raise DatasetError(f"{dataset}: expected directory {path} is missing. {hint}")
    return path
