"""Retrieval metrics for deep metric learning: Recall@K, MAP@R, R-Precision, mAP@k and NMI.

Pure functions on tensors (no Lightning). Conventions, shared by every backend:

* cosine similarity: embeddings are L2-normalised here, so the score is a dot product;
* a query never retrieves itself: it is excluded by its position in the evaluated set (its
  dataset index), not by dropping the first neighbour, which duplicates and ties break;
* ties: among equal scores the gallery item with the lower dataset index ranks first (a
  stable sort by descending score);
* queries without a positive in the gallery are left out of every average and counted in
  ``queries_without_positive``.

Every ranking metric follows from the ranks of a query's positives (0-based positions in
its ranked gallery list), and only ranks below ``cap = max(max K, map_at_k, R)`` matter.
The search computes those ranks exactly without sorting any gallery list, with memory
bounded by a chunk of queries (never an N x N matrix):

1. one matrix product per chunk of queries gives the (c, G) scores against the gallery,
   whose columns follow the dataset index (so the tie rule reads "lower column first");
   each query's positives are gathered through a list of the columns ordered by class;
2. the scores are cut into blocks of ``b`` columns and each block's maximum is taken
   (one streaming pass); a block whose maximum is below a threshold holds nothing above it;
3. a positive with ``cap`` or more negatives provably ranked before it has rank ``>= cap``
   and is dropped. A block proves them when its maximum is above the positive's score, or
   equal to it with the block wholly before the positive's column; it counts b when all
   its items are equal (minimum = maximum: a block of ties), else 1. Only queries that
   would otherwise read more than ``cap`` items are checked (their reaching blocks are
   read once for the block minima). The threshold of a query is the score of its worst
   remaining positive;
4. only the blocks reaching that threshold (tied ones only up to the positive's block) are
   read again; their negatives are placed among the query's positives by a binary search
   on exact order keys (the score's bits), which gives each positive the exact number of
   negatives ranked before it. A negative whose score equals positives' scores is placed
   within that run of tied positives by one more binary search on (run, column), so a tie
   group costs log of its size per item, never its size.

The work beyond the matrix product is one pass over the scores plus a cost proportional to
the number of items read in step 4: at most ``cap`` blocks per query (the pruning bound),
and for tied scores about as many items as for untied scores of the same size (issue #19:
a collapsed model's all-equal scores used to cost N^3).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.core.contracts import DEFAULT_MEMORY_BUDGET, RankedLists

__all__ = [
    "retrieval_metrics", "ranked_list_metrics", "nmi", "default_chunk_size", "count_duplicate_rows",
    "QueryRankings", "query_rankings", "ranked_list_rankings",
]

_NO_RANK = 2**62  # rank of a positive that is not (or need not be) located


# ---------------------------------------------------------------------------- input checks
@dataclass
class _EvalSet:
    """Validated inputs, rows in ascending dataset-index order, on the compute device."""

    embeddings: torch.Tensor  # (N, D) float32, L2-normalised
    labels: torch.Tensor  # (N,) int64
    is_query: torch.Tensor  # (N,) bool
    is_gallery: torch.Tensor  # (N,) bool


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_vector(x: torch.Tensor | np.ndarray | Sequence, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but there are {n} embeddings; pass one {name} "
            "entry per embedding row."
        )
    if dtype == torch.bool and t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (a mask); got dtype {t.dtype}.")
    if dtype == torch.int64 and (t.is_floating_point() or t.dtype == torch.bool or t.is_complex()):
        raise TypeError(f"{name} must hold integers; got dtype {t.dtype}.")
    return t.to(dtype)


def _check_ks(recall_ks: Sequence[int], map_at_k: int) -> tuple[int, ...]:
    ks = tuple(int(k) for k in recall_ks)
    if not ks:
        raise ValueError("recall_ks is empty; pass at least one K, e.g. (1, 2, 4, 8).")
    if any(k < 1 for k in ks) or any(k != k_ for k, k_ in zip(ks, recall_ks)):
        raise ValueError(f"recall_ks must be positive integers; got {list(recall_ks)}.")
    if int(map_at_k) < 1:
        raise ValueError(f"map_at_k must be a positive integer; got {map_at_k}.")
    return tuple(sorted(set(ks)))


def _prepare_roles(
    labels: torch.Tensor,
    is_query: torch.Tensor | None,
    is_gallery: torch.Tensor | None,
    indices: torch.Tensor | None,
    n: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check labels, roles and indices; return (order or None, labels, is_query, is_gallery).

    ``order`` sorts rows by dataset index (None when they already are); the returned
    vectors are already in that order.
    """
    if n == 0:
        raise ValueError(
            "The evaluation split is empty: there are no embeddings to evaluate. Check that the "
            "datamodule's evaluation dataloader yields samples for this split."
        )
    labels = _as_vector(labels, "labels", n, torch.int64).to(device)
    is_query = torch.ones(n, dtype=torch.bool) if is_query is None else _as_vector(is_query, "is_query", n, torch.bool)
    is_gallery = (
        torch.ones(n, dtype=torch.bool) if is_gallery is None else _as_vector(is_gallery, "is_gallery", n, torch.bool)
    )
    is_query, is_gallery = is_query.to(device), is_gallery.to(device)
    order = None
    if indices is not None:
        idx = _as_vector(indices, "indices", n, torch.int64).to(device)
        order = torch.argsort(idx, stable=True)  # (N,)
        sorted_idx = idx[order]
        dup = sorted_idx[1:] == sorted_idx[:-1]
        if bool(dup.any()):
            raise ValueError(
                f"indices are not unique (dataset index {int(sorted_idx[1:][dup][0])} appears more than once). "
                "Remove duplicate samples (e.g. DistributedSampler padding) before computing metrics."
            )
        if bool((order == torch.arange(n, device=device)).all()):
            order = None
        else:
            labels, is_query, is_gallery = labels[order], is_query[order], is_gallery[order]
    if not bool(is_query.any()):
        raise ValueError("No sample is flagged as a query (is_query is all False); there is nothing to evaluate.")
    if not bool(is_gallery.any()):
        raise ValueError(
            "No sample is flagged as a gallery item (is_gallery is all False); queries have nothing to retrieve."
        )
    return order, labels, is_query, is_gallery


def _prepare(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    is_query: torch.Tensor | None,
    is_gallery: torch.Tensor | None,
    indices: torch.Tensor | None,
    device: torch.device,
) -> _EvalSet:
    """Check shapes, dtypes and values; sort rows by dataset index; L2-normalise."""
    emb = torch.as_tensor(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) tensor; got shape {tuple(emb.shape)}.")
    if not emb.is_floating_point():
        raise TypeError(f"embeddings must be floating point; got dtype {emb.dtype}.")
    n = emb.shape[0]
    order, labels, is_query, is_gallery = _prepare_roles(labels, is_query, is_gallery, indices, n, device)
    if emb.shape[1] == 0:
        raise ValueError("embeddings have 0 dimensions; the method's embedding head produced no features.")
    emb = emb.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(emb.sum(dim=1)).all()):  # one cheap pass; NaN and inf propagate
        bad = (~torch.isfinite(emb).all(dim=1)).nonzero().flatten()
        if bad.numel() == 0:
            raise ValueError(
                f"embeddings are too large for float32 arithmetic (max |x| = {emb.abs().max():.3g}); "
                "scale them down (they are L2-normalised anyway)."
            )
        raise ValueError(
            f"{bad.numel()} of {n} embeddings contain NaN or inf (first at row {int(bad[0])}). The model "
            "produced non-finite features: check the loss, the learning rate and mixed precision."
        )
    if order is not None:
        emb = emb[order]
    return _EvalSet(F.normalize(emb, dim=1), labels, is_query, is_gallery)


def _positives_per_query(labels: torch.Tensor, qpos: torch.Tensor, gpos: torch.Tensor) -> torch.Tensor:
    """(Q,) R: gallery samples sharing each query's label, the query itself excluded."""
    glab = labels[gpos].sort().values
    qlab = labels[qpos]
    count = torch.searchsorted(glab, qlab, side="right") - torch.searchsorted(glab, qlab, side="left")
    in_gallery = torch.zeros_like(labels, dtype=torch.bool)
    in_gallery[gpos] = True
    return count - in_gallery[qpos].long()


def _no_positive_error(num_queries: int) -> ValueError:
    return ValueError(
        f"None of the {num_queries} queries has a positive (a gallery sample with its label, other than "
        "itself): the metrics are undefined. Check the labels and the is_query / is_gallery flags of the split."
    )


# ---------------------------------------------------------------------------- rank -> metric
def _metric_sums(
    ranks: torch.Tensor, num_pos: torch.Tensor, recall_ks: tuple[int, ...], map_at_k: int
) -> torch.Tensor:
    """Per-metric sums over the queries of one chunk, from the ranks of their positives.

    ``ranks`` is (c, H): ascending 0-based ranks of each query's located positives (the i-th
    column is the i-th best positive), padded with a large value. ``num_pos`` is (c,) = R.
    Returns float64 (len(recall_ks) + 3,): hits for each K, then MAP@R, R-Precision, mAP@k.
    Queries with R = 0 must not be passed.
    """
    c, h = ranks.shape
    r = num_pos.to(torch.float64)  # (c,)
    first = ranks[:, 0] if h > 0 else torch.full((c,), _NO_RANK, dtype=torch.int64, device=ranks.device)
    ks = torch.tensor(recall_ks, device=ranks.device)
    hits = (first[:, None] < ks[None, :]).sum(0, dtype=torch.float64)  # (len(ks),)
    if h == 0:
        return torch.cat([hits, torch.zeros(3, dtype=torch.float64, device=ranks.device)])
    ordinal = torch.arange(1, h + 1, device=ranks.device, dtype=torch.float64)  # i-th positive
    precision = ordinal[None, :] / (ranks.to(torch.float64) + 1.0)  # (c, H) P@(rank+1) at each hit
    in_r = ranks < num_pos[:, None]  # (c, H) hit within the top R
    in_k = ranks < map_at_k
    map_r = ((precision * in_r).sum(1) / r).sum()
    r_prec = (in_r.sum(1, dtype=torch.float64) / r).sum()
    map_k = ((precision * in_k).sum(1) / r.clamp(max=map_at_k)).sum()
    return torch.cat([hits, torch.stack([map_r, r_prec, map_k])])


def _finish(
    sums: torch.Tensor, num_queries: int, num_gallery: int, without_positive: int, recall_ks: tuple[int, ...], map_at_k: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    values = (sums / num_queries).tolist()
    for k, v in zip(recall_ks, values):
        out[f"R@{k}"] = v
    out["MAP@R"], out["R-Precision"], out[f"mAP@{map_at_k}"] = values[len(recall_ks) :]
    out["num_queries"] = num_queries
    out["num_gallery"] = num_gallery
    out["queries_without_positive"] = without_positive
    return out


# ---------------------------------------------------------------------------- exact order keys
def _float_order(values: torch.Tensor) -> torch.Tensor:
    """int32 with the order of the float32 values, exactly.

    The float's sign-magnitude bits become a two's-complement integer with the same order
    (comparisons are then exact, never subject to rounding; -0.0 and +0.0 both map to 0, as
    they compare equal). Finite values and +-inf map into [-0x7F800000, 0x7F800000].
    """
    bits = values.view(torch.int32)
    sign = bits >> 31  # 0 or -1
    return ((bits & 0x7FFFFFFF) ^ sign) - sign


def _order_key(values: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort (row ascending, float32 score descending) exactly; the row goes in
    the upper 32 bits."""
    return ((row << 32) + 2**31) - _float_order(values)  # larger score -> smaller key, within the row


def _rank_key(values: torch.Tensor, minor: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort (float32 score descending, ``minor`` ascending) exactly.

    With ``minor`` a block or column number (in [0, 2**31)), a key below another's is an item
    ranked before it under the tie rule. 2**31 - order lies in [2**23, 2**32), so the key
    stays below 2**63.
    """
    return ((2**31 - _float_order(values).long()) << 31) + minor


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a stretch of many mid-sized CPU ops on one thread.

    The matrix product and the block maxima use every core; the ops that follow are short,
    and each parallel region costs a synchronisation of the thread team, which dominates
    them (and costs far more when other processes share the cores). The setting is restored.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _exact_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Disable TF32 for the similarity products (CUDA) so every backend ranks alike."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def default_chunk_size(num_gallery: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Queries per chunk so that the (chunk, G) fp32 score block stays within the budget."""
    return max(1, min(4096, memory_budget // (4 * max(num_gallery, 1))))


def _block_size(num_gallery: int, cap: int) -> int:
    """Columns per block: at least 1.5 * cap blocks so that pruning by block counts can act."""
    b = 2 ** int(math.floor(math.log2(max(num_gallery / (1.5 * cap), 1.0))))
    return int(min(max(b, 8), 64))


class _Gallery:
    """Gallery embeddings in dataset-index order, padded to whole blocks.

    The columns follow the dataset index, so the tie rule (lower index first) reads "lower
    column first", and a block wholly before a column holds only items of lower index: this
    lets whole blocks of tied scores be counted without reading their items.
    ``members`` lists the columns class by class (label, then index), so that a query's
    positives are one contiguous range of it, delimited by ``labels`` (sorted).
    """

    def __init__(self, data: _EvalSet, block: int) -> None:
        positions = data.is_gallery.nonzero().flatten()  # (G,) ascending dataset index
        self.labels, self.members = data.labels[positions].sort(stable=True)  # (G,) sorted labels, their columns
        self.size = g = positions.numel()
        self.block = block
        self.num_blocks = -(-g // block)
        padded = self.num_blocks * block
        self.embeddings = data.embeddings.new_zeros(padded, data.embeddings.shape[1])  # (Gp, D)
        self.embeddings[:g] = data.embeddings[positions]
        self.column = torch.full_like(data.labels, -1)  # (N,) column of each sample, -1 if not gallery
        self.column[positions] = torch.arange(g, device=positions.device)


def _kept_prefix(
    bkey: torch.Tensor,
    pkey: torch.Tensor,
    num_pos: torch.Tensor,
    cap: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """How many of each query's best positives have fewer than ``cap`` negatives provably above.

    ``bkey`` (o, nb) and ``pkey`` (o, W) are the :func:`_rank_key` of the block maxima (with
    the block number) and of the positives (with their block): a block whose key is below a
    positive's holds ``weight`` (o, nb) negatives ranked before it (see :func:`_prune`). A
    positive with ``cap`` or more of them has rank >= cap and cannot change any metric. The
    count grows along the positives (sorted by descending score, then index: a later
    positive counts every block an earlier one counts), so a binary search over the first
    ``num_pos`` (o,) finds the kept prefix in log2(R + 1) passes over the keys.
    """
    lo = torch.zeros_like(num_pos)
    hi = num_pos.clone()
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        above = bkey < pkey.gather(1, mid.clamp(max=pkey.shape[1] - 1)[:, None])  # (o, nb) counted blocks
        kept = (weight * above).sum(1) < cap  # (o,)
        active = lo < hi
        lo = torch.where(active & kept, mid + 1, lo)
        hi = torch.where(active & ~kept, mid, hi)
    return lo


def _last_kept(pval: torch.Tensor, pblk: torch.Tensor, n_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(o,) score and block of each query's worst kept positive; +inf where none is kept."""
    at = (n_kept - 1).clamp(min=0)[:, None]  # (o, 1)
    value = torch.where(n_kept > 0, pval.gather(1, at).squeeze(1), float("inf"))
    return value, pblk.gather(1, at).squeeze(1)


def _tie_weights(scores: torch.Tensor, blockmax: torch.Tensor, rows: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """(r, nb) float weights of the blocks of the given rows: b for a block of equal items, else 1.

    Every item of a block whose minimum equals its maximum equals the maximum, so it counts
    b items wherever its maximum counts (see :func:`_prune`); any other block holds at least
    one item equal to its maximum. The weights are exact integers (float64 beyond 2**24
    columns, so that their sums stay exact). Only the blocks in ``reach`` (r, nb) are read:
    every sum the weights enter is over blocks whose maximum reaches the row's worst kept
    positive, and on untied scores these are a few percent of a row (a minimum over whole
    rows was 7 % of the suite's time at SOP scale). The blocks go in slices of at most 1/16
    of the score block; the rest keep weight 1.
    """
    c, nb = blockmax.shape
    b = scores.shape[1] // nb
    dtype = torch.float32 if scores.shape[1] < 2**24 else torch.float64
    out = torch.ones(rows.numel(), nb, dtype=dtype, device=scores.device)
    cand = reach.nonzero()  # (P, 2) (index into rows, block)
    blocks = scores.view(c * nb, b)
    step = max(1, scores.numel() // (16 * b))
    for start in range(0, cand.shape[0], step):
        r, blk = cand[start : start + step].unbind(1)
        flat = rows[r] * nb + blk  # (p,) blocks in the (c * nb, b) view
        tied = blocks.index_select(0, flat).amin(dim=1) == blockmax.view(-1)[flat]  # (p,)
        out[r[tied], blk[tied]] = float(b)
    return out


def _prune(
    blockmax: torch.Tensor,
    weight: torch.Tensor,
    pval: torch.Tensor,
    pblk: torch.Tensor,
    n_kept: torch.Tensor,
    cap: torch.Tensor,
) -> torch.Tensor:
    """(o,) kept positives of o queries: drop those whose rank is provably >= cap.

    A block holds negatives ranked before a positive of score v in block p when its maximum
    is above v, or equal to v with the block wholly before p (all its items have a lower
    dataset index: the tie rule puts the tied maximum first). It holds at least ``weight``
    of them (:func:`_tie_weights`). Counting a block of tied items as b items, not once, is
    what lets a positive behind many tied items of lower index be dropped (a collapsed
    model's all-equal scores are the extreme case); counted once, a block full of tied
    items would leave the positive kept and every item be read one by one. The exact key of
    :func:`_rank_key` makes each test one comparison. ``blockmax`` and ``weight`` are
    (o, nb); ``pval`` / ``pblk`` (o, W) the positives' scores and blocks; ``n_kept`` (o,).
    Only the queries whose worst kept positive is provably that deep go through the binary
    search of :func:`_kept_prefix`.
    """
    nb = blockmax.shape[1]
    bkey = _rank_key(blockmax, torch.arange(nb, device=blockmax.device)[None, :])  # (o, nb)
    pkey = _rank_key(pval, pblk)  # (o, W)
    last = pkey.gather(1, (n_kept - 1).clamp(min=0)[:, None])  # (o, 1) worst kept positive
    deep = ((n_kept > 0) & ((weight * (bkey < last)).sum(1) >= cap)).nonzero().flatten()
    if deep.numel() == 0:
        return n_kept
    n_kept = n_kept.clone()
    n_kept[deep] = _kept_prefix(bkey[deep], pkey[deep], n_kept[deep], cap[deep], weight[deep])
    return n_kept


def _chunk_ranks(
    scores: torch.Tensor,
    gallery: _Gallery,
    lo: torch.Tensor,
    hi: torch.Tensor,
    self_col: torch.Tensor,
    num_pos: torch.Tensor,
    cap: torch.Tensor,
    pool: ThreadPoolExecutor | None = None,
) -> torch.Tensor:
    """Exact ranks (c, K) of the positives of c queries whose ranks can be below ``cap``.

    ``scores`` is the (c, Gp) score block (padding and self already at -inf; positives are
    overwritten with -inf here). ``lo``/``hi`` delimit each query's class in
    ``gallery.members``, ``self_col`` is its own column or -1, ``num_pos`` (R) is at least 1.
    Ranks are ascending per row, padded with ``_NO_RANK``. With a ``pool`` (CPU), steps 3
    and 4 run on row slices in parallel (see :func:`_ranks_in_parts`).
    """
    c = scores.shape[0]
    dev = scores.device
    b, nb = gallery.block, gallery.num_blocks
    rows = torch.arange(c, device=dev)

    # Positives: the class's columns (ascending), self removed; sorted by (score desc, index
    # asc) (a stable sort keeps the column order, which is the dataset-index order).
    width = int((hi - lo).max())
    slot = lo[:, None] + torch.arange(width, device=dev)  # (c, W) places in the class-ordered columns
    in_class = slot < hi[:, None]
    pcol = gallery.members[slot.clamp_(max=gallery.size - 1)]  # (c, W) columns
    pvalid = in_class & (pcol != self_col[:, None])
    pval = torch.where(pvalid, scores.gather(1, pcol), float("-inf"))  # (c, W)
    # From here on the score block holds negatives only: a positive's rank is the number of
    # negatives before it plus the number of positives before it (its place in this order).
    scores[rows[:, None].expand_as(pcol)[pvalid], pcol[pvalid]] = float("-inf")
    pval, perm = pval.sort(dim=1, descending=True, stable=True)
    pcol = pcol.gather(1, perm)

    # Block maxima: a block whose maximum is below a threshold holds nothing above it.
    if b >= 32:  # the fastest reduction differs with the block width (CPU kernels)
        blockmax = scores.view(c, nb, b).amax(dim=2)  # (c, nb)
    else:
        blockmax = F.max_pool1d(scores.view(c, 1, nb * b), b).view(c, nb)
    return _ranks_in_parts(pool, scores, blockmax, pval, pcol, num_pos, cap)


# Rows per part below which splitting a chunk across threads costs more than it saves.
_MIN_ROWS_PER_PART = 128


def _single_thread_worker() -> None:
    """Initializer of the rank pool's threads: each runs its ops on one thread (see below)."""
    torch.set_num_threads(1)


def _rank_pool(device: torch.device) -> ThreadPoolExecutor | None:
    """Threads for :func:`_ranks_in_parts` on CPU: one per intra-op thread beyond the caller's."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return None
    return ThreadPoolExecutor(threads - 1, thread_name_prefix="ranks", initializer=_single_thread_worker)


def _ranks_in_parts(pool: ThreadPoolExecutor | None, *per_row: torch.Tensor) -> torch.Tensor:
    """:func:`_ranks_from_blocks` of one chunk, on row slices in parallel on CPU.

    ``per_row`` are that function's arguments (scores, blockmax, pval, pcol, num_pos, cap),
    each with one row per query. Steps 3 and 4 are many mid-sized ops, each too short to gain
    from an intra-op thread team (the team's synchronisation dominates them): they run on one
    thread, which left the other cores idle for ~15 % of the suite at SOP scale (2 cores).
    Rows are independent, so the chunk is cut into one slice per thread, each searched
    single-threaded (torch releases the GIL inside its ops; the calling thread takes the first
    slice). The ranks are the same as one call's, padded to a common width.
    """
    c = per_row[0].shape[0]
    parts = 1 if pool is None else min(torch.get_num_threads(), c // _MIN_ROWS_PER_PART)  # pool: threads - 1
    if parts <= 1:
        with _one_cpu_thread(per_row[0].device):
            return _ranks_from_blocks(*per_row)
    edges = [c * i // parts for i in range(parts + 1)]
    slices = [slice(edges[i], edges[i + 1]) for i in range(parts)]

    def run(sl: slice) -> torch.Tensor:
        return _ranks_from_blocks(*(t[sl] for t in per_row))

    with _one_cpu_thread(per_row[0].device):
        futures = [pool.submit(run, sl) for sl in slices[1:]]
        pieces = [run(slices[0])] + [f.result() for f in futures]  # (c_i, K_i) each
    width = max(p.shape[1] for p in pieces)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=_NO_RANK) for p in pieces])


def _negative_slots(
    blocks: torch.Tensor,
    crow: torch.Tensor,
    cblk: torch.Tensor,
    nb: int,
    threshold: torch.Tensor,
    pkey: torch.Tensor,
    tkey: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots and rows of the negatives at or above their row's threshold in candidate blocks.

    ``blocks`` is the score block viewed as (c * nb, b); ``crow``/``cblk`` (P,) name the
    candidate blocks. An item's slot is the flat index of the first kept positive (in
    ``pkey`` order) that it outranks; it outranks every later positive of its row as well.
    ``tkey`` (n_pos,) orders the positives by (key, column): see :func:`_ranks_from_blocks`.
    """
    b = blocks.shape[1]
    vals = blocks.index_select(0, crow * nb + cblk)  # (P, b)
    item = (vals >= threshold[crow, None]).view(-1).nonzero().squeeze(1)  # (n,) into (P * b)
    item_block = item >> (b.bit_length() - 1)  # b is a power of two
    irow = crow.index_select(0, item_block)  # (n,) rows ascending
    ikey = _order_key(vals.view(-1).index_select(0, item), irow)  # (n,)
    slot = torch.searchsorted(pkey, ikey, side="right")  # past every positive scoring >= item
    tied = ((slot > 0) & (pkey[(slot - 1).clamp(min=0)] == ikey)).nonzero().flatten()
    if tied.numel():  # equal scores: the lower dataset index (column) ranks first
        icol = cblk[item_block[tied]] * b + (item[tied] & (b - 1))  # (t,) the items' columns
        t_left = torch.searchsorted(pkey, ikey[tied], side="left")  # (t,) first equal positive
        # The first positive of the run of equal scores with a higher column: one search per
        # tied item over the whole run at once (a run is N / 2 long for a collapsed two-class
        # set), never a walk along it.
        slot[tied] = torch.searchsorted(tkey, t_left * (nb * b) + icol)  # nb * b = Gp
    return slot, irow


def _ranks_from_blocks(
    scores: torch.Tensor,
    blockmax: torch.Tensor,
    pval: torch.Tensor,
    pcol: torch.Tensor,
    num_pos: torch.Tensor,
    cap: torch.Tensor,
) -> torch.Tensor:
    """Steps 3 and 4 of the search for one chunk: prune positives, count negatives above.

    ``scores`` (c, Gp) holds negatives only; ``blockmax`` (c, nb) its block maxima; ``pval``
    / ``pcol`` (c, W) the positives' scores and columns, sorted by (score desc, index asc).
    """
    c, nb = blockmax.shape
    dev = scores.device
    b = scores.shape[1] // nb
    rows = torch.arange(c, device=dev)
    pblk = pcol >> (b.bit_length() - 1)  # (c, W) block of each positive; b is a power of two
    n_kept = num_pos.clone()
    value, vblk = _last_kept(pval, pblk, n_kept)  # (c,) worst kept positive
    reach = blockmax >= value[:, None]  # (c, nb) blocks that may hold a negative above it
    # Rows that would read more than cap items (a few, unless scores tie massively): drop
    # the positives whose rank is provably >= cap, counting blocks of tied items in full.
    wide = (reach.sum(1) * b > cap).nonzero().flatten()
    if wide.numel():
        weight = _tie_weights(scores, blockmax, wide, reach[wide])  # (w, nb)
        # The bound counts reaching blocks only: rows where even all of them make less than
        # cap cannot drop anything (e.g. untied scores with fewer than cap blocks).
        can_drop = ((weight * reach[wide]).sum(1) >= cap[wide]).nonzero().flatten()
        wide, weight = wide[can_drop], weight[can_drop]
    if wide.numel():
        n_kept[wide] = _prune(blockmax[wide], weight, pval[wide], pblk[wide], n_kept[wide], cap[wide])
        value[wide], vblk[wide] = _last_kept(pval[wide], pblk[wide], n_kept[wide])
        reach[wide] = blockmax[wide] >= value[wide, None]
    kmax = int(n_kept.max())
    if kmax == 0:
        return torch.full((c, 0), _NO_RANK, dtype=torch.int64, device=dev)
    cand = reach.nonzero()  # (P, 2) candidate (row, block)
    # A block whose maximum equals the worst kept positive's score but lies after its block
    # holds only tied items of higher index, ranked after every kept positive.
    crow, cblk = cand.unbind(1)
    late = (blockmax[crow, cblk] == value[crow]) & (cblk > vblk[crow])
    if bool(late.any()):
        cand = cand[~late]
    kept = torch.arange(kmax, device=dev)[None, :] < n_kept[:, None]  # (c, K)
    pval, pcol = pval[:, :kmax], pcol[:, :kmax]

    # Kept positives, flattened row-major; keys ascending, equal keys in dataset-index order.
    pkey = _order_key(pval, rows[:, None])[kept]  # (n_pos,)
    # Tie key: (first index of the run of equal keys) * Gp + column sorts the positives by
    # (key, column), i.e. the tie rule, with one integer (< n_pos * Gp, far below 2**63).
    n_pos, gp = pkey.numel(), scores.shape[1]
    new_run = torch.ones(n_pos, dtype=torch.bool, device=dev)
    new_run[1:] = pkey[1:] != pkey[:-1]
    run_start = torch.where(new_run, torch.arange(n_pos, device=dev), 0).cummax(0).values  # (n_pos,)
    tkey = run_start * gp + pcol[kept]  # (n_pos,) ascending
    # A negative outranks every kept positive of its row from its "slot" on: a histogram of
    # slots, with one extra slot per row so that counts never leak into the next row. The
    # candidates go in slices, which bounds the memory of the item arrays.
    hist = torch.zeros(pkey.numel() + c, dtype=torch.int64, device=dev)
    step = max(1, scores.numel() // (16 * b))  # candidate blocks per slice: <= 1/16 of the block
    for start in range(0, cand.shape[0], step):
        crow, cblk = cand[start : start + step].unbind(1)
        slot, irow = _negative_slots(scores.view(c * nb, b), crow, cblk, nb, value, pkey, tkey)
        hist += torch.bincount(slot + irow, minlength=hist.numel())
    csum = hist.cumsum(0)  # (n_pos + c,)
    within = kept.long().cumsum(1)[kept] - 1  # (n_pos,) positives before it in its row
    prow = rows[:, None].expand(c, kmax)[kept]  # (n_pos,)
    ext = torch.arange(pkey.numel(), device=dev) + prow  # extended slot of each positive
    row_first = ext - within  # extended slot of the row's first positive
    before = csum[ext] - torch.where(row_first > 0, csum[(row_first - 1).clamp(min=0)], 0)
    ranks = torch.full((c, kmax), _NO_RANK, dtype=torch.int64, device=dev)
    ranks[kept] = before + within
    return ranks


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    is_query: torch.Tensor | None = None,
    is_gallery: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    map_at_k: int = 1000,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    *,
    block_size: int | None = None,
) -> dict[str, float]:
    """Recall@K, MAP@R, R-Precision and mAP@k of a query/gallery split, exactly.

    Args:
        embeddings: (N, D) features; L2-normalised here (cosine similarity).
        labels: (N,) class ids.
        is_query / is_gallery: (N,) bool roles; default: every sample is both (a query
            never retrieves itself).
        indices: (N,) unique dataset indices; they fix the tie order (lower index first)
            and identify the query in the gallery. Default: row order.
        recall_ks: the K of Recall@K (hit rate: a positive among the K nearest).
        map_at_k: k of mAP@k, average precision over the top k, divided by min(R, k).
        chunk_size: queries per similarity block; default keeps the (chunk, G) fp32 block
            within 256 MiB.
        device: "cpu", "cuda", a torch.device, or None/"auto" (CUDA when available).
        block_size: columns per block of the pruning pass, a power of two >= 8 (a tuning knob;
            default derived from the gallery size and the deepest rank needed). The gallery
            is padded to whole blocks, which also keeps BLAS on kernels that give identical
            scores to identical embeddings wherever they sit.

    Returns:
        ``R@K`` for each K, ``MAP@R``, ``R-Precision``, ``mAP@<map_at_k>`` (averages over
        the queries that have at least one positive), and the counts ``num_queries`` (those
        queries), ``num_gallery`` and ``queries_without_positive``.
    """
    ks = _check_ks(recall_ks, map_at_k)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of queries; got {chunk_size}.")
    if block_size is not None and (block_size < 8 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two >= 8; got {block_size}.")
    dev = _resolve_device(device)
    data = _prepare(embeddings, labels, is_query, is_gallery, indices, dev)
    qpos = data.is_query.nonzero().flatten()  # (Q,) ascending dataset index
    depth = max(max(ks), int(map_at_k))
    gallery = _Gallery(data, block_size or _block_size(int(data.is_gallery.sum()), depth))
    qlab = data.labels[qpos]
    lo = torch.searchsorted(gallery.labels, qlab, side="left")  # (Q,) class range in gallery.members
    hi = torch.searchsorted(gallery.labels, qlab, side="right")
    self_col = gallery.column[qpos]  # (Q,) -1 when the query is not in the gallery
    num_pos = hi - lo - (self_col >= 0).long()  # (Q,) R
    has_pos = num_pos > 0
    without_positive = int((~has_pos).sum())
    if without_positive == qpos.numel():
        raise _no_positive_error(qpos.numel())
    qpos, lo, hi, self_col, num_pos = qpos[has_pos], lo[has_pos], hi[has_pos], self_col[has_pos], num_pos[has_pos]
    cap = num_pos.clamp(min=depth)  # (Q,) deepest rank that matters for each query
    q = qpos.numel()
    sums = torch.zeros(len(ks) + 3, dtype=torch.float64, device=dev)
    gp = gallery.num_blocks * gallery.block
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(gp)
    buffer = torch.empty(min(chunk, max(q, 1)), gp, device=dev)  # (c, Gp) reused for every chunk
    pool = _rank_pool(dev)
    with torch.no_grad(), _exact_fp32_matmul(dev), pool or contextlib.nullcontext():
        for a in range(0, q, chunk):
            sl = slice(a, min(a + chunk, q))
            c = sl.stop - sl.start
            scores = buffer[:c]
            torch.mm(data.embeddings[qpos[sl]], gallery.embeddings.T, out=scores)  # (c, D) @ (D, Gp)
            if gp > gallery.size:
                scores[:, gallery.size :] = float("-inf")
            in_gallery = (self_col[sl] >= 0).nonzero().flatten()
            scores[in_gallery, self_col[sl][in_gallery]] = float("-inf")
            ranks = _chunk_ranks(scores, gallery, lo[sl], hi[sl], self_col[sl], num_pos[sl], cap[sl], pool)
            sums += _metric_sums(ranks, num_pos[sl], ks, int(map_at_k))
    return _finish(sums.cpu(), q, gallery.size, without_positive, ks, int(map_at_k))


# ---------------------------------------------------------------------------- ranked lists
def ranked_list_metrics(
    ranked: RankedLists | torch.Tensor,
    labels: torch.Tensor,
    is_query: torch.Tensor | None = None,
    is_gallery: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    map_at_k: int = 1000,
) -> dict[str, float]:
    """The metrics of :func:`retrieval_metrics`, from given neighbour lists of length k.

    Ranks are exact up to k; a positive beyond the list counts as a miss, so Recall@K with
    K > k, R-Precision and MAP@R with R > k, and mAP@m with m > k are lower bounds of what
    a full ranking would give. R (the number of positives) still comes from ``labels``.

    Args:
        ranked: (Q, k) positions into the N samples (ascending dataset index, i.e. rows of
            ``labels`` sorted by ``indices``), one row per query in that same order; ``-1``
            pads short rows. Entries must be distinct gallery samples other than the query.
        labels, is_query, is_gallery, indices: as in :func:`retrieval_metrics`.
    """
    ks = _check_ks(recall_ks, map_at_k)
    lists = ranked.indices if isinstance(ranked, RankedLists) else torch.as_tensor(ranked)
    dev = lists.device
    n = torch.as_tensor(labels).shape[0] if torch.as_tensor(labels).ndim == 1 else -1
    if n < 0:
        raise ValueError(f"labels must be 1-D (N,); got shape {tuple(torch.as_tensor(labels).shape)}.")
    _, labels, is_query, is_gallery = _prepare_roles(labels, is_query, is_gallery, indices, n, dev)
    qpos = is_query.nonzero().flatten()  # (Q,)
    if lists.ndim != 2 or lists.shape[0] != qpos.numel():
        raise ValueError(
            f"ranked lists have shape {tuple(lists.shape)} but there are {qpos.numel()} queries; return one "
            "row per query (ascending dataset index), i.e. shape (num_queries, k)."
        )
    lists = lists.to(torch.int64)
    pad = lists < 0  # (Q, k)
    if bool((lists >= n).any()) or bool((lists < -1).any()):
        raise ValueError(f"ranked list entries must be positions in [0, {n}) or -1 for padding.")
    safe = lists.clamp(min=0)
    if bool((~is_gallery[safe] & ~pad).any()):
        raise ValueError("ranked lists contain samples that are not in the gallery (is_gallery is False).")
    if bool(((safe == qpos[:, None]) & ~pad).any()):
        raise ValueError("ranked lists contain the query itself; exclude each query from its own list.")
    if lists.shape[1] > 1:
        distinct = torch.where(pad, -1 - torch.arange(lists.shape[1], device=dev), lists).sort(dim=1).values
        if bool((distinct[:, 1:] == distinct[:, :-1]).any()):
            raise ValueError("a ranked list contains the same gallery sample twice; lists must be duplicate-free.")

    num_pos = _positives_per_query(labels, qpos, is_gallery.nonzero().flatten())  # (Q,)
    has_pos = num_pos > 0
    if not bool(has_pos.any()):
        raise _no_positive_error(qpos.numel())
    rel = (labels[safe] == labels[qpos][:, None]) & ~pad  # (Q, k) relevance of each entry
    position = torch.arange(lists.shape[1], device=dev).expand_as(lists)
    ranks = torch.where(rel, position, _NO_RANK).sort(dim=1).values  # (Q, k) ascending hit ranks
    h = int(rel.sum(1).max()) if rel.numel() else 0
    sums = _metric_sums(ranks[has_pos, :h], num_pos[has_pos], ks, int(map_at_k))
    return _finish(sums.cpu(), int(has_pos.sum()), int(is_gallery.sum()), int((~has_pos).sum()), ks, int(map_at_k))


# ---------------------------------------------------------------------------- per-query rankings
@dataclass
class QueryRankings:
    """What each query's ranking looks like: its top of the list and its first positive.

    The same ranking the metrics score (cosine of L2-normalised float32 embeddings, the query
    itself excluded, ties to the lower dataset index), or a method's :class:`RankedLists`.
    Rows follow the queries in ascending dataset index; positions index the N evaluated
    samples in that order too.

    Attributes:
        queries: (Q,) positions of the queries.
        top: (Q, k) positions of each query's first k gallery samples, best first (-1: none).
        scores: (Q, k) their cosine similarity to the query (NaN where unknown or none).
        first_positive: (Q,) 0-based rank of the best-ranked positive; -1 when the query has no
            positive in the gallery; ``list_length`` when ranked lists end before any positive.
        num_positives: (Q,) R, the positives of each query.
        list_length: the length of ranked lists (0 for a full ranking of the gallery).
    """

    queries: torch.Tensor
    top: torch.Tensor
    scores: torch.Tensor
    first_positive: torch.Tensor
    num_positives: torch.Tensor
    list_length: int = 0

    def recall_at_1(self) -> float:
        """R@1 over the queries that have a positive (the metrics' average)."""
        has = self.first_positive >= 0
        return float((self.first_positive[has] == 0).double().mean()) if bool(has.any()) else float("nan")


def query_rankings(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    is_query: torch.Tensor | None = None,
    is_gallery: torch.Tensor | None = None,
    k: int = 8,
    chunk_size: int | None = None,
    device: str | torch.device | None = "cpu",
) -> QueryRankings:
    """Each query's top-``k`` gallery samples and the rank of its first positive, exactly.

    Rows must be in ascending dataset index (as the evaluator holds them). The ranks follow
    the conventions of :func:`retrieval_metrics` (float32 cosine scores, self-exclusion,
    ties to the lower index), so ``first_positive == 0`` averages to its R@1. Memory stays
    within a (chunk, G) block of scores; the work is one matrix product and two passes over it.
    """
    dev = _resolve_device(device)
    data = _prepare(embeddings, labels, is_query, is_gallery, None, dev)
    qpos = data.is_query.nonzero().flatten()  # (Q,)
    gpos = data.is_gallery.nonzero().flatten()  # (G,)
    g = gpos.numel()
    k = max(0, min(int(k), g))
    column = torch.full_like(data.labels, -1)
    column[gpos] = torch.arange(g, device=dev)
    gallery, glab = data.embeddings[gpos], data.labels[gpos]
    columns = torch.arange(g, device=dev)
    chunk = int(chunk_size) if chunk_size is not None else max(1, min(4096, (1 << 23) // max(g, 1)))
    top, scores, first = [], [], []
    with torch.no_grad(), _exact_fp32_matmul(dev):
        for a in range(0, qpos.numel(), chunk):
            rows = qpos[a : a + chunk]
            s = data.embeddings[rows] @ gallery.T  # (c, G)
            own = column[rows]
            inside = (own >= 0).nonzero().flatten()
            s[inside, own[inside]] = float("-inf")  # a query never retrieves itself
            order = _exact_top(s, k, columns)  # (c, k) columns, best first, ties to the lower column
            picked = s.gather(1, order)
            valid = torch.isfinite(picked)
            top.append(torch.where(valid, gpos[order], -1))
            scores.append(torch.where(valid, picked, float("nan")))
            # the first positive: its score, then the lowest column among positives with that score
            positive = glab[None, :] == data.labels[rows][:, None]  # (c, G)
            positive[inside, own[inside]] = False
            best = s.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
            equal = s == best
            best_col = (positive & equal).to(torch.uint8).argmax(dim=1, keepdim=True)  # first such column
            ahead = (s > best).sum(dim=1, dtype=torch.int32)  # int32 sums of masks: twice as fast as int64
            tied = (equal.sum(dim=1, dtype=torch.int32) > 1).nonzero().flatten()  # others share its score
            if tied.numel():
                ahead[tied] += (equal[tied] & (columns[None, :] < best_col[tied])).sum(dim=1, dtype=torch.int32)
            first.append(torch.where(torch.isfinite(best[:, 0]), ahead.long(), -1))
    num_pos = _positives_per_query(data.labels, qpos, gpos)
    cat = (lambda parts, empty: torch.cat(parts) if parts else empty)  # noqa: E731
    return QueryRankings(
        queries=qpos.cpu(),
        top=cat(top, torch.zeros(0, k, dtype=torch.int64)).cpu(),
        scores=cat(scores, torch.zeros(0, k)).cpu(),
        first_positive=cat(first, torch.zeros(0, dtype=torch.int64)).cpu(),
        num_positives=num_pos.cpu(),
    )


def _exact_top(scores: torch.Tensor, k: int, columns: torch.Tensor) -> torch.Tensor:
    """(c, G) scores -> (c, k) columns of the k best, by score then lower column (the tie rule).

    A float top-k, re-sorted stably by score from column order; rows where items tied with
    the k-th score were left out (a tie across the cut) are redone with exact order keys.
    """
    if k == 0:
        return scores.new_zeros(scores.shape[0], 0, dtype=torch.int64)
    values, cols = scores.topk(k, dim=1)  # (c, k) best first, ties in any order
    cols = cols.sort(dim=1).values  # column order ...
    vals = scores.gather(1, cols)
    cols = cols.gather(1, vals.sort(dim=1, descending=True, stable=True).indices)  # ... then score, stably
    kth = values[:, -1:]
    cut = (scores == kth).sum(dim=1, dtype=torch.int32) > (values == kth).sum(dim=1, dtype=torch.int32)  # a tie across the cut
    if bool(cut.any()):
        rows = cut.nonzero().flatten()
        key = _rank_key(scores[rows], columns)
        cols[rows] = torch.topk(key, k, dim=1, largest=False, sorted=True).indices
    return cols


def ranked_list_rankings(
    ranked: RankedLists | torch.Tensor,
    labels: torch.Tensor,
    is_query: torch.Tensor,
    is_gallery: torch.Tensor,
    embeddings: torch.Tensor | None = None,
    k: int = 8,
) -> QueryRankings:
    """:class:`QueryRankings` of a method's ranked lists (what :func:`ranked_list_metrics` scores).

    ``scores`` are the cosine similarities of ``embeddings`` (the plain ones: the lists carry
    no scores) when given, else NaN. A query whose list holds no positive gets
    ``first_positive = list_length`` (it counts as a miss at every K up to the list's length).
    """
    lists = (ranked.indices if isinstance(ranked, RankedLists) else torch.as_tensor(ranked)).cpu().long()
    labels = torch.as_tensor(labels).cpu().long()
    is_query, is_gallery = torch.as_tensor(is_query).cpu().bool(), torch.as_tensor(is_gallery).cpu().bool()
    qpos = is_query.nonzero().flatten()
    num_pos = _positives_per_query(labels, qpos, is_gallery.nonzero().flatten())
    length = int(lists.shape[1])
    pad = lists < 0
    rel = (labels[lists.clamp(min=0)] == labels[qpos][:, None]) & ~pad  # (Q, L)
    position = torch.arange(length).expand_as(lists)
    first = torch.where(rel, position, length).amin(dim=1) if length else torch.zeros(len(qpos), dtype=torch.int64)
    first = torch.where(num_pos > 0, first, -1)
    top = lists[:, : max(0, int(k))]
    scores = torch.full(top.shape, float("nan"))
    if embeddings is not None and top.numel():
        emb = F.normalize(torch.as_tensor(embeddings).detach().cpu().float(), dim=1)
        cos = (emb[qpos][:, None, :] * emb[top.clamp(min=0)]).sum(-1)  # (Q, k)
        scores = torch.where(top >= 0, cos, float("nan"))
    return QueryRankings(queries=qpos, top=top, scores=scores, first_positive=first, num_positives=num_pos,
                         list_length=length)


# ---------------------------------------------------------------------------- collapse check
def count_duplicate_rows(embeddings: torch.Tensor) -> int:
    """The number of rows equal to an earlier row (compared as float32, like the metrics' scores).

    ``k`` identical rows count ``k - 1``; an all-equal (N, D) matrix gives N - 1. Many equal
    rows mean a collapsed model (a dead head, a diverged run), whose scores then tie and are
    ranked by dataset index alone. One ``torch.unique(dim=0)`` (a sort of the rows): about
    a second for 60,502 x 512 on 2 CPU cores, a few percent of the metrics; it measured
    faster there than hashing the rows first. -0.0 equals +0.0.
    """
    x = torch.as_tensor(embeddings).detach()
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) tensor; got shape {tuple(x.shape)}.")
    if x.shape[0] < 2 or x.shape[1] == 0:
        return max(x.shape[0] - 1, 0)
    x = x.to(torch.float32) + 0.0  # + 0.0 turns -0.0 into +0.0
    return x.shape[0] - torch.unique(x, dim=0).shape[0]


# ---------------------------------------------------------------------------- clustering
def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi_from_assignments(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information 2 I(Y; C) / (H(Y) + H(C)) from two labelings."""
    labels = np.asarray(labels).ravel()
    clusters = np.asarray(clusters).ravel()
    if labels.shape != clusters.shape or labels.size == 0:
        raise ValueError(f"NMI needs two non-empty labelings of equal length; got {labels.size} and {clusters.size}.")
    _, y = np.unique(labels, return_inverse=True)
    _, k = np.unique(clusters, return_inverse=True)
    ny, nk = int(y.max()) + 1, int(k.max()) + 1
    joint = np.bincount(y * nk + k, minlength=ny * nk).reshape(ny, nk).astype(np.float64)  # contingency
    n = joint.sum()
    a, b = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = float((joint[nz] / n * np.log(joint[nz] * n / np.outer(a, b)[nz])).sum())
    h = _entropy(a) + _entropy(b)
    if h == 0.0:  # both labelings are a single group: identical partitions
        return 1.0
    return float(np.clip(2.0 * mutual / h, 0.0, 1.0))


def nmi(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    num_clusters: int | None = None,
    niter: int = 20,
    use_gpu: bool | None = None,
) -> float:
    """NMI between the labels and a faiss k-means clustering of the L2-normalised embeddings.

    The number of clusters defaults to the number of distinct labels (the DML convention).
    k-means uses every point (no subsampling) and a fixed seed, so the value is reproducible.
    """
    import faiss

    emb = torch.as_tensor(embeddings).detach()
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"NMI needs a non-empty (N, D) embedding matrix; got shape {tuple(emb.shape)}.")
    y = torch.as_tensor(labels).detach().cpu().numpy()
    if y.shape != (emb.shape[0],):
        raise ValueError(f"labels has shape {y.shape} but there are {emb.shape[0]} embeddings.")
    x = F.normalize(emb.to(torch.float32), dim=1).cpu().numpy()
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf; NMI cannot be computed.")
    k = int(num_clusters or len(np.unique(y)))
    if k <= 1:
        return nmi_from_assignments(y, np.zeros_like(y))
    k = min(k, x.shape[0])
    if use_gpu is None:
        use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 and emb.is_cuda
    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, gpu=bool(use_gpu), verbose=False,
        max_points_per_centroid=x.shape[0], min_points_per_centroid=1,
    )
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    return nmi_from_assignments(y, assign.ravel())
