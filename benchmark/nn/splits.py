"""Class-stratified splits of a labelled set, for methods that carve a second set out of the training split.

DMCAC divides the training images into a query set (the training batches) and a retrieval
database; a method that holds out a memory bank, a support set or a validation subset of its
training classes splits the same way: every class with at least two images is in both parts.
Only numpy is imported.
"""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, database_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split sample positions into (query, database), stratified over classes.

    Every class with ``n >= 2`` images puts ``round(n * database_fraction)`` of them, clamped
    to ``[1, n - 1]``, into the database and the rest into the query set, so it appears in
    both. A class with a single image cannot be in both: it goes to the query set (it still
    trains the classifiers; its queries retrieve other classes' database entries). The
    choice within a class is random with ``seed`` and independent of the training seed.

    Returns sorted int64 arrays of positions into ``labels``; they are disjoint and cover it.
    """
    labels = np.asarray(labels)
    if not 0.0 < database_fraction < 1.0:
        raise ValueError(f"database_fraction must be in (0, 1), got {database_fraction}.")
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-d array, got shape {labels.shape}.")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_db = np.floor(counts * database_fraction + 0.5).astype(np.int64)  # round half up
    n_db = np.where(counts >= 2, np.clip(n_db, 1, counts - 1), 0)  # (C,)
    keys = np.random.default_rng(seed).random(len(labels))
    order = np.lexsort((keys, inverse))  # grouped by class, random within a class
    starts = np.cumsum(counts) - counts  # (C,) first position of each class in ``order``
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - np.repeat(starts, counts)  # rank within the class
    in_db = rank < n_db[inverse]
    return np.flatnonzero(~in_db).astype(np.int64), np.flatnonzero(in_db).astype(np.int64)
