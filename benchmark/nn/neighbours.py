"""Exact k-nearest-neighbour search by inner product, written once for every method.

:func:`exact_knn` (and :class:`ExactIndex`, which keeps a database and, with faiss, its index
between searches) returns each query's ``k`` database rows of largest inner product, best
first, with the conventions of the evaluation (``benchmark/engine/evaluation/metrics.py``):

* exact, and deterministic under ties: among equal scores the *lower database row* comes
  first (a stable sort by descending score); both backends follow this rule;
* self-exclusion by dataset index: with ``query_ids`` (and ``database_ids``, default the row
  numbers) the database row carrying the query's own id is never returned; not by dropping
  the first neighbour, which duplicates and ties break.

Backends:

* ``torch``: chunked matrix products on the queries' device (CPU or GPU), memory bounded by
  a chunk of queries (never a Q x M matrix), and no full sort of a row: the columns are
  grouped into strided blocks and super-blocks, the k-th best super-block maximum is a
  threshold that at least k columns reach, and only the blocks reaching it are ranked, by
  exact (score, row) keys;
* ``faiss``: ``IndexFlatIP`` on CPU, or on the GPU when faiss has GPU support and the queries
  are on CUDA. faiss's own scores are used; its results are re-ordered by the tie rule, and
  rows whose fetched list ends in a tie are searched again with a longer list.

Only torch, numpy and (optionally) faiss are imported.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np
import torch

from benchmark.core.contracts import DEFAULT_MEMORY_BUDGET

__all__ = ["DEFAULT_MEMORY_BUDGET", "ExactIndex", "KnnFunc", "drop_self", "exact_knn", "faiss_available", "self_rows"]

SearchBackend = Literal["torch", "faiss"]



class KnnFunc(Protocol):
    """What methods accept as a neighbour search (``exact_knn`` by default)."""

    def __call__(
        self,
        queries: torch.Tensor,
        database: torch.Tensor,
        k: int,
        query_ids: torch.Tensor | None = None,
        database_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def self_rows(query_ids: torch.Tensor, database_ids: torch.Tensor) -> torch.Tensor:
    """(Q,) ids, (M,) distinct ids -> (Q,) int64: the database row holding each query's id, or -1."""
    query_ids = torch.as_tensor(query_ids).to(database_ids.device).long().flatten()
    database_ids = database_ids.long().flatten()
    if database_ids.numel() == 0:
        return torch.full_like(query_ids, -1)
    sorted_ids, perm = database_ids.sort()
    if bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
        raise ValueError("database_ids must be distinct (one database row per dataset index).")
    pos = torch.searchsorted(sorted_ids, query_ids).clamp_(max=len(sorted_ids) - 1)  # (Q,)
    return torch.where(sorted_ids[pos] == query_ids, perm[pos], torch.full_like(pos, -1))


def drop_self(neighbours: torch.Tensor, exclude: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` of (Q, K) neighbour rows that are not ``exclude`` (Q,) (-1: none), rank kept.

    A stable argsort moves the query's own row, wherever it is (or nothing), to the end.
    """
    return neighbours.gather(1, _self_last(neighbours, exclude)[:, :k])  # (Q, k)


def _self_last(neighbours: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """(Q, K) order that moves the query's own row to the end by a stable argsort (rank kept)."""
    is_self = neighbours == exclude[:, None]  # (Q, K)
    return torch.argsort(is_self.to(torch.int8), dim=1, stable=True)  # non-self first, in order


def _ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 in [-2^31, 2^31) with the order of the float32 ``values`` (-0.0 folded onto +0.0)."""
    bits = (values.float() + 0.0).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()


class ExactIndex:
    """A database for repeated exact inner-product searches (see the module docstring).

    Args:
        database: (M, D) rows searched (float32 or float64; any norm).
        database_ids: (M,) distinct dataset indices of the rows, used for self-exclusion;
            default the row numbers.
        backend: ``torch`` or ``faiss``.
    """

    def __init__(
        self, database: torch.Tensor, database_ids: torch.Tensor | None = None, backend: SearchBackend = "torch"
    ) -> None:
        if database.ndim != 2:
            raise ValueError(f"The database must be (M, D); got shape {tuple(database.shape)}.")
        if backend not in ("torch", "faiss"):
            raise ValueError(f"Unknown neighbour search backend {backend!r}; choose torch or faiss.")
        if not bool(torch.isfinite(database).all()):
            raise ValueError("The database contains NaN or infinite values; exact search needs finite features.")
        if database_ids is not None and database_ids.shape != (database.shape[0],):
            raise ValueError(f"database_ids must be ({database.shape[0]},); got shape {tuple(database_ids.shape)}.")
        self.database = database.detach()
        self.database_ids = database_ids
        self.backend = backend
        self._faiss: Any = None
        self._faiss_resources: Any = None
        if backend == "faiss":
            self._build_faiss()

    def __len__(self) -> int:
        return self.database.shape[0]

    def _build_faiss(self) -> None:
        try:
            import faiss
        except ImportError:
            raise ImportError("The faiss neighbour search needs faiss (pip install faiss-cpu); or use 'torch'.") from None
        index: Any = faiss.IndexFlatIP(self.database.shape[1])
        if self.database.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._faiss_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._faiss_resources, self.database.device.index or 0, index)
        index.add(np.ascontiguousarray(self.database.float().cpu().numpy()))
        self._faiss = index

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        query_ids: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best database rows of every query, best first.

        Args:
            queries: (Q, D) features.
            k: neighbours per query (at most M, or M - 1 with ``query_ids``).
            query_ids: (Q,) dataset index of each query: the database row with that id is
                never returned (a query without one in the database loses nothing).
            chunk_size: queries per score block of the torch backend (default: about
                256 MiB of scores).

        Returns:
            ``(rows (Q, k) int64, scores (Q, k))`` on the queries' device; the scores are in the
            compute dtype (float32, or float64 for float64 inputs).
        """
        num_db = len(self)
        if queries.ndim != 2 or queries.shape[1] != self.database.shape[1]:
            raise ValueError(
                f"Neighbour search needs (Q, D) queries and (M, D) database rows of the same D; got "
                f"{tuple(queries.shape)} and {tuple(self.database.shape)}."
            )
        if query_ids is not None and query_ids.shape != (queries.shape[0],):
            raise ValueError(f"query_ids must be ({queries.shape[0]},); got shape {tuple(query_ids.shape)}.")
        excluding = query_ids is not None
        available = num_db - int(excluding)
        if k < 0 or k > available:
            raise ValueError(
                f"Cannot find {k} neighbours among {num_db} database rows"
                f"{' (each query excluded from its own list)' if excluding else ''}: lower k or search a larger "
                "database."
            )
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("The queries contain NaN or infinite values; exact search needs finite features.")
        device = queries.device
        dtype = torch.promote_types(torch.promote_types(queries.dtype, self.database.dtype), torch.float32)
        if self.backend == "faiss":
            dtype = torch.float32
        if k == 0 or queries.shape[0] == 0:
            return (
                torch.zeros(queries.shape[0], k, dtype=torch.long, device=device),
                torch.zeros(queries.shape[0], k, dtype=dtype, device=device),
            )
        exclude = None
        if excluding:
            ids = self.database_ids if self.database_ids is not None else torch.arange(num_db)
            exclude = self_rows(query_ids, ids.to(device)).to(device)  # (Q,) row or -1
        if self.backend == "faiss":
            rows, scores = self._search_faiss(queries, k, exclude)
        else:
            rows, scores = _search_torch(queries.to(dtype), self.database.to(device, dtype), k, exclude, chunk_size)
        return rows.to(device), scores.to(device)

    def _search_faiss(
        self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_q, num_db = queries.shape[0], len(self)
        x = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        excl = exclude.cpu() if exclude is not None else torch.full((num_q,), -1, dtype=torch.long)
        rows_out = torch.empty(num_q, k, dtype=torch.long)
        scores_out = torch.empty(num_q, k)
        todo = torch.arange(num_q)
        fetch = min(k + int(exclude is not None) + 1, num_db)  # one more: a tie at the boundary shows
        while todo.numel():
            found_d, found_i = self._faiss.search(x[todo.numpy()], fetch)  # (r, fetch) best first
            scores, rows = torch.from_numpy(found_d), torch.from_numpy(found_i).long()
            # The tie rule: by (score descending, row ascending), then the query's own row last.
            order = rows.argsort(dim=1, stable=True)
            rows, scores = rows.gather(1, order), scores.gather(1, order)
            order = scores.argsort(dim=1, descending=True, stable=True)
            order = order.gather(1, _self_last(rows.gather(1, order), excl[todo]))[:, :k]
            kept, kept_scores = rows.gather(1, order), scores.gather(1, order)  # (r, k)
            # A row whose shortest fetched score equals its k-th kept one may hide tied rows of
            # lower index beyond the list: search it again with a longer list.
            last = torch.from_numpy(found_d[:, -1])
            again = (last >= kept_scores[:, -1]) if fetch < num_db else torch.zeros(len(todo), dtype=torch.bool)
            done = ~again
            rows_out[todo[done]], scores_out[todo[done]] = kept[done], kept_scores[done]
            todo, fetch = todo[again], min(2 * fetch, num_db)
        return rows_out, scores_out


def _search_torch(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend on (Q, D) queries and (M, D) rows of one float dtype and device.

    Works on ``d = q . (-b)`` (the negated score, so that "best" is "smallest"; the negation
    is exact). One matrix product per chunk of queries; the columns are grouped into strided
    blocks and super-blocks, and the k-th smallest super-block minimum is a threshold that
    at least k columns reach: the k best are at or below it. Only the blocks whose minimum
    reaches it are read again, and their columns are ranked by (d, column).
    """
    (n, dim), m, device, dtype = queries.shape, database.shape[0], queries.device, queries.dtype
    # Columns per super-block: a power of two <= 256 that leaves >= 4 k super-blocks.
    group = 1
    while group < 256 and m // (2 * group) >= 4 * k:
        group *= 2
    bs = min(16, group)  # columns per block
    nsuper = -(-m // group)
    mp, nb = nsuper * group, nsuper * group // bs
    kp = min(k, nsuper)  # nsuper >= k: a single-column group has m - 1 >= k finite columns
    neg = database.new_zeros(mp, dim)  # (Mp, D) negated rows, zero padding
    neg[:m] = -database
    itemsize = torch.finfo(dtype).bits // 8
    chunk = int(chunk_size) if chunk_size else max(1, min(8192, DEFAULT_MEMORY_BUDGET // (itemsize * mp)))
    buffer = torch.empty(min(chunk, n), mp, device=device, dtype=dtype)  # (c, Mp) reused for every chunk
    strides = torch.arange(bs, device=device) * nb  # column t * nb + j belongs to block j
    indices = torch.empty(n, k, dtype=torch.long, device=device)
    scores = torch.empty(n, k, dtype=dtype, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        c = stop - start
        d = buffer[:c]
        torch.mm(queries[start:stop], neg.T, out=d)  # (c, D) @ (D, Mp)
        d[:, m:] = float("inf")  # padding
        if exclude is not None:
            own = exclude[start:stop]
            inside = (own >= 0).nonzero().flatten()
            d[inside, own[inside]] = float("inf")  # a query is not its own neighbour
        block_min = d.view(c, bs, nb).amin(1)  # (c, nb): block j = columns j, j + nb, ...
        super_min = block_min.view(c, group // bs, nsuper).amin(1)  # (c, nsuper): blocks j, j + nsuper, ...
        threshold = super_min.topk(kp, dim=1, largest=False).values[:, -1:]  # (c, 1): >= kp columns reach it
        # Blocks holding a column <= threshold (every such column is in one), padded per row.
        r, blk = (block_min <= threshold).nonzero(as_tuple=True)  # row-major
        counts = torch.bincount(r, minlength=c)
        slot = torch.arange(r.numel(), device=device) - (counts.cumsum(0) - counts)[r]
        blocks = torch.full((c, int(counts.max())), nb, dtype=torch.long, device=device)  # nb = padding
        blocks[r, slot] = blk
        pad = (blocks == nb)[:, :, None].expand(-1, -1, bs).flatten(1)  # (c, W * bs)
        cols = (blocks[:, :, None] + strides).flatten(1).masked_fill_(pad, 0)  # (c, W * bs)
        if dtype == torch.float32:
            # Exact (value, column) order: order-preserving int32 of the float, then the column.
            key = (_ordered_bits(d.gather(1, cols)) << 32) | cols
            key.masked_fill_(pad, torch.iinfo(torch.int64).max)  # there are >= k real candidates
            best = key.topk(k, dim=1, largest=False).values & 0xFFFFFFFF  # (c, k) ascending
        else:  # float64: a stable sort by column, then a stable sort by value
            values = d.gather(1, cols).masked_fill_(pad, float("inf"))
            order = cols.argsort(dim=1, stable=True)
            cols, values = cols.gather(1, order), values.gather(1, order)
            best = cols.gather(1, values.argsort(dim=1, stable=True)[:, :k])
        indices[start:stop] = best
        scores[start:stop] = -d.gather(1, best)
    return indices, scores


def exact_knn(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    query_ids: torch.Tensor | None = None,
    database_ids: torch.Tensor | None = None,
    backend: SearchBackend = "torch",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` database rows of largest inner product with every query, best first.

    Args:
        queries: (Q, D) features.
        database: (M, D) features searched.
        k: neighbours per query.
        query_ids: (Q,) dataset index of each query; the database row with the same id
            (``database_ids``, default the row number) is never returned.
        database_ids: (M,) distinct dataset indices of the database rows.
        backend: ``torch`` or ``faiss`` (see the module docstring).
        chunk_size: queries per score block of the torch backend.

    Returns:
        ``(rows (Q, k) int64, scores (Q, k))``; ties broken by the lower row.
    """
    return ExactIndex(database, database_ids, backend).search(queries, k, query_ids, chunk_size)
