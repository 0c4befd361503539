"""k-NN contexts: the neighbours a sample is refined with or compared against, found once.

A context is the embeddings of a sample's ``k`` nearest neighbours in a bank (a training split,
a retrieval database, an evaluation gallery). Methods that attend over it (Context-Refine's
cross-attention blocks), compare distributions over it (DMCAC's views) or average it share these
three steps:

* :func:`knn_search`: the neighbour rows of every query, exact (ties to the lower row, as in the
  evaluation), the query's own row excluded by index, on torch or faiss
  (:func:`benchmark.nn.neighbours.exact_knn`);
* :func:`union_of_neighbours`: the union of the neighbour lists of several views of one query,
  padded to the largest union of the batch with a mask (a context shared by the views);
* :func:`mean_context`: the parameter-free aggregation, the normalised mean of a sample and its
  context.

Only torch is imported, and the project's :mod:`benchmark.core.validation` and
:mod:`benchmark.nn.neighbours`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from benchmark.core.validation import check_choice
from benchmark.nn.neighbours import exact_knn

KnnBackend = Literal["auto", "torch", "faiss"]


def knn_search(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    backend: KnnBackend = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The ``k`` most similar database rows of every query (inner product), best first.

    :func:`benchmark.nn.neighbours.exact_knn` (exact; ties broken by the lower row).

    Args:
        queries: (Q, D) embeddings (L2-normalised: inner product = cosine similarity).
        database: (M, D) embeddings searched.
        k: neighbours per query.
        exclude: (Q,) int64 database row that query q must never get (its own entry, by
            index, not by assuming it comes first: duplicates and ties break that), or -1.
        backend: ``torch`` (chunked matmul, exact, on the data's device), ``faiss``
            (``IndexFlatIP``, on the GPU when faiss has GPU support and the data is on CUDA)
            or ``auto`` (= ``torch``: on this benchmark's 2-core CPU it was 3x faster than
            faiss for an SOP-sized set, and on GPU it needs no faiss-gpu build).
        chunk_size: queries per similarity block of the torch backend (default: the (c, M)
            block stays within 256 MiB).

    Returns:
        (Q, k) int64 database rows on the queries' device.
    """
    check_choice("knn_backend", backend, KnnBackend)
    if exclude is not None and exclude.shape != (queries.shape[0],):
        raise ValueError(
            f"exclude must be (Q,) = ({queries.shape[0]},) database rows or -1; got shape {tuple(exclude.shape)}."
        )
    rows, _ = exact_knn(
        queries,
        database,
        k,
        query_ids=exclude,
        backend="torch" if backend == "auto" else backend,
        chunk_size=chunk_size,
    )
    return rows



def union_of_neighbours(neighbours: torch.Tensor, num_database: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the union of its views' neighbour indices, padded to the largest union.

    Args:
        neighbours: (B, A, k) database positions retrieved by the A views of each query.
        num_database: N, the database size (used as the padding sentinel while sorting).

    Returns:
        indices: (B, T) union members in ascending order, then padding (position 0);
        mask: (B, T) True for union members. ``T`` is the largest union in the batch.
    """
    b = neighbours.shape[0]
    flat, _ = neighbours.reshape(b, -1).sort(dim=1)  # (B, A * k)
    duplicate = torch.zeros_like(flat, dtype=torch.bool)
    duplicate[:, 1:] = flat[:, 1:] == flat[:, :-1]
    flat, _ = flat.masked_fill(duplicate, num_database).sort(dim=1)  # members first, sentinels last
    mask = flat < num_database  # (B, A * k)
    t = int(mask.sum(dim=1).max())
    return flat[:, :t].masked_fill(~mask[:, :t], 0), mask[:, :t]



def mean_context(e0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The normalised mean of (B, D) ``e0`` and its (B, k, D) context (average query expansion).

    A parameter-free aggregation of a k-NN context: Context-Refine's Table 4 'NNs' ablation.
    """
    stacked = torch.cat([e0[:, None], context], dim=1)  # (B, 1 + k, D)
    return F.normalize(stacked.mean(dim=1), dim=-1)

