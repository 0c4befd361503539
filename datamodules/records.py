"""Plain, framework-free description of a retrieval dataset on disk.

A reader turns an official on-disk layout into :class:`DatasetRecords`: lists of image
paths with class ids and query/gallery flags. Everything downstream (datasets, samplers,
the evaluation callback) works from these arrays, so a reader is the only dataset-specific
code there is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmark.core.errors import UserError


class DatasetError(UserError, RuntimeError):
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


def find_dataset_dir(root: Path | str, marker: str, nested: str, *, dataset: str, hint: str) -> Path:
    """The dataset directory: ``root`` if it holds the file ``marker``, else ``root/nested``.

    Users pass either the extracted folder or its parent; both are accepted, and anything
    else fails naming the two places that were looked at.
    """
    root = Path(root).expanduser()
    require_dir(root, dataset, hint)
    if (root / marker).is_file():
        return root.resolve()
    if (root / nested).is_dir():
        return (root / nested).resolve()
    raise DatasetError(f"{dataset}: neither {root / marker} nor {root / nested / marker} exists. {hint}")


def split_by_class(
    paths: list[str], classes: np.ndarray, num_train_classes: int, source: Path | str, *, dataset: str, hint: str
) -> dict[str, SplitRecords]:
    """The conventional class-disjoint split: original class ids 1..num_train_classes train, the rest test."""
    is_train = classes <= num_train_classes  # (N,)
    splits = {}
    for split, mask in (("train", is_train), ("test", ~is_train)):
        idx = np.flatnonzero(mask)
        splits[split] = SplitRecords.from_original_ids([paths[i] for i in idx], classes[idx])
        require_nonempty(splits[split], split, source, dataset=dataset, hint=hint)
    return splits


# --------------------------------------------------------------------------------------
# List-file helpers shared by all readers: whitespace-separated tables, integer columns,
# uniqueness and range checks, each failing with a DatasetError naming file and line.
# --------------------------------------------------------------------------------------


def read_table(
    path: Path,
    columns: Sequence[str],
    *,
    dataset: str,
    hint: str,
    skip: int = 0,
    header: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a whitespace-separated list file into an ``(N, len(columns))`` array of strings.

    The first ``skip`` lines are ignored; with ``header=True`` the next line must then be
    exactly the column names. Blank lines are ignored. Also returns the 1-based line number
    of every row, so later checks can point at the offending line.
    """
    require_file(path, dataset, hint)
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM
    except UnicodeDecodeError as err:
        raise DatasetError(f"{dataset}: {path} is not a UTF-8 text file ({err}). {hint}") from err
    lines = text.splitlines()
    if header:
        found = lines[skip] if skip < len(lines) else "<end of file>"
        if found.split() != list(columns):
            raise DatasetError(
                f"{dataset}: {path}, line {skip + 1}: expected the header {' '.join(columns)!r}, "
                f"found {found!r}. {hint}"
            )
        skip += 1
    lines = lines[skip:]
    fields = [line.split() for line in lines]
    counts = np.fromiter(map(len, fields), dtype=np.int64, count=len(fields))
    nonblank = counts > 0
    bad = np.flatnonzero(nonblank & (counts != len(columns)))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            f"{dataset}: {path}, line {i + skip + 1}: expected {len(columns)} whitespace-separated "
            f"fields ({' '.join(columns)}), found {counts[i]}: {str(lines[i])!r}. {hint}"
        )
    if not nonblank.all():
        fields = [f for f, keep in zip(fields, nonblank) if keep]
    table = np.array(fields, dtype=str).reshape(-1, len(columns))
    line_numbers = np.flatnonzero(nonblank) + skip + 1
    return table, line_numbers


def parse_int_column(
    values: np.ndarray, line_numbers: np.ndarray, path: Path, column: str, *, dataset: str, hint: str
) -> np.ndarray:
    """Convert a column of strings to int64, naming the first non-integer entry and its line."""
    try:
        return values.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    for value, line in zip(values, line_numbers):
        try:
            np.int64(int(value))
        except (ValueError, OverflowError):
            raise DatasetError(
                f"{dataset}: {path}, line {line}: {column} must be an integer, found {str(value)!r}. {hint}"
            ) from None
    raise DatasetError(f"{dataset}: {path}: column {column} is not a valid integer column. {hint}")


def check_unique(
    values: np.ndarray,
    line_numbers: np.ndarray,
    path: Path | str,
    what: str,
    *,
    dataset: str,
    hint: str,
    unit: str = "line",
) -> None:
    """Raise if ``values`` has a duplicate, naming both occurrences (``unit``: "line", "entry")."""
    uniq, counts = np.unique(values, return_counts=True)
    if len(uniq) == len(values):
        return
    dup = uniq[np.argmax(counts > 1)].item()
    where = np.flatnonzero(values == dup)[:2]
    raise DatasetError(
        f"{dataset}: {path}: duplicate {what} {dup!r} at {unit} {line_numbers[where[0]]} and "
        f"{unit} {line_numbers[where[1]]}. {hint}"
    )


def check_range(
    values: np.ndarray,
    low: int,
    high: int,
    line_numbers: np.ndarray,
    path: Path | str,
    what: str,
    *,
    dataset: str,
    hint: str,
    unit: str = "line",
) -> None:
    """Raise if any of ``values`` lies outside ``[low, high]``, naming the first one and its line."""
    bad = np.flatnonzero((values < low) | (values > high))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            f"{dataset}: {path}, {unit} {line_numbers[i]}: {what} {values[i]} is outside {low}..{high}. {hint}"
        )


def absolute_paths(base: Path, relative: Sequence[str]) -> list[str]:
    """Join relative image paths onto ``base`` as absolute strings (fast for 100k+ entries)."""
    prefix = str(base.expanduser().resolve()) + os.sep
    return [prefix + p for p in relative]


def require_nonempty(split: SplitRecords, name: str, source: Path | str, *, dataset: str, hint: str) -> None:
    """Raise if a split has no images (e.g. a truncated list file)."""
    if len(split) == 0:
        raise DatasetError(f"{dataset}: the {name} split read from {source} is empty. {hint}")
