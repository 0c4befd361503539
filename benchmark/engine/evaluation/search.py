"""The exact search behind :func:`retrieval_metrics`: Recall@K, MAP@R, R-Precision and mAP@k.

The heart of the evaluation, kept apart from the shared conventions
(:mod:`~benchmark.engine.evaluation.conventions`) and the other entry points (ranked lists,
per-query rankings, NMI) so that the algorithm reads on its own.

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

import torch
import torch.nn.functional as F

from benchmark.core.contracts import DEFAULT_MEMORY_BUDGET
from benchmark.engine.evaluation.conventions import (
    _NO_RANK,
    _check_ks,
    _EvalSet,
    _exact_fp32_matmul,
    _finish,
    _metric_sums,
    _no_positive_error,
    _order_key,
    _prepare,
    _rank_key,
    _resolve_device,
)


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
