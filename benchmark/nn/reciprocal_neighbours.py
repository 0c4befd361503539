"""k-NN graphs and reciprocal k-NN batches: which samples form a small neighbourhood graph around each sample.

Written for Intra-Batch's test time (Seidenschwarz et al., ICML 2021, Supp. C.3: the trained
message-passing network refines every evaluated sample inside a batch of its reciprocal
neighbours), usable by any method that needs a neighbourhood of a sample rather than its plain
neighbour list (test-time refinement, re-ranking, graph batches):

* :func:`knn_graph`: self-first k-nearest-neighbour lists into a database by squared Euclidean
  distance, exact and deterministic under ties, without an N x N matrix (the shared exact
  search, :func:`benchmark.nn.neighbours.exact_knn`);
* :func:`reciprocal_knn_batches`: the k-reciprocal neighbourhood of every sample with the
  expansion step of k-reciprocal re-ranking (Zhong et al., CVPR 2017), ordered by distance and
  cut or filled up to a fixed batch size, vectorised over all samples (it reaches Stanford
  Online Products on a CPU: ``python -m benchmark perf reciprocal``). Samples outside the
  database (In-Shop queries) draw their batch from database samples.

Only torch is imported, and :mod:`benchmark.nn.neighbours`.
"""

from __future__ import annotations

import torch

from benchmark.nn.neighbours import exact_knn

# A tolerance on the reciprocal-overlap test so that alpha = 2/3 behaves as the exact fraction.
_OVERLAP_TOLERANCE = 1e-9


def _check_embeddings(embeddings: torch.Tensor, database: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D); got shape {tuple(embeddings.shape)}.")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values; the neighbour graph needs finite features.")
    database = torch.as_tensor(database, dtype=torch.bool, device=embeddings.device).flatten()
    if database.numel() != len(embeddings):
        raise ValueError(f"The database mask has {database.numel()} entries for {len(embeddings)} embeddings.")
    return embeddings.float(), database


def knn_graph(
    embeddings: torch.Tensor,
    database: torch.Tensor,
    k: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-first k-nearest-neighbour lists into a database, by squared Euclidean distance.

    Row i is ``[i, n_1, ..., n_k]``: the sample itself, then its k nearest *other* database
    samples ordered by (distance, index); a sample outside the database still comes first in
    its own list. Exact (ties broken by the lower index) without an N x N matrix and without
    sorting rows: the shared exact search (:func:`benchmark.nn.neighbours.exact_knn`, torch
    backend) on ``[a, 1] . [2 b, -||b||^2] = ||a||^2 - ||a - b||^2``.

    Args:
        embeddings: (N, D) features (any norm).
        database: (N,) bool, the samples that can be neighbours (at least ``k + 1``).
        k: neighbours per sample besides itself.
        chunk_size: rows per product (default: about 256 MiB of distances per chunk).

    Returns:
        ``(indices, distances)``, (N, k + 1) int64 and float32; column 0 is the sample itself
        at distance 0.
    """
    return _knn_graph(*_check_embeddings(embeddings, database), k, chunk_size)


def _knn_graph(
    emb: torch.Tensor, database: torch.Tensor, k: int, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn_graph` on checked float32 embeddings and a bool database mask.

    ``||a - b||^2 = ||a||^2 - [a, 1] . [2 b, -||b||^2]``: the largest inner products of the
    exact search (:func:`benchmark.nn.neighbours.exact_knn`, ties by the lower database row, i.e.
    the lower sample index) are the smallest distances, and a sample is excluded from its own
    list by its index.
    """
    n, device = emb.shape[0], emb.device
    db = database.nonzero().flatten()  # (M,) ascending sample index
    m = db.numel()
    if k < 1 or k > m - 1:
        raise ValueError(f"k={k} neighbours need 1 <= k <= (database size - 1) = {m - 1}.")
    sq = emb.pow(2).sum(1)  # (N,)
    queries = torch.cat([emb, emb.new_ones(n, 1)], 1)  # (N, D+1) [a, 1]
    rows = torch.cat([emb[db] * 2, -sq[db, None]], 1)  # (M, D+1) [2 b, -||b||^2]
    samples = torch.arange(n, device=device)
    found, scores = exact_knn(queries, rows, k, query_ids=samples, database_ids=db, chunk_size=chunk_size)
    indices = torch.cat([samples[:, None], db[found]], 1)  # (N, k+1): the sample itself first
    distances = torch.cat([emb.new_zeros(n, 1), sq[:, None] - scores], 1)  # ||a||^2 - score
    return indices, distances


def _edge_keys(nbr: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted keys ``j * N + n`` of the edges j -> n of the lists ``N_k(j)`` (for membership)."""
    n = len(nbr)
    return (torch.arange(n, device=nbr.device)[:, None] * n + nbr[:, : k + 1]).flatten().sort().values


def _has_edge(keys: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """Whether ``dst`` is in the list of ``src`` (any shape), by binary search in ``keys``."""
    key = src * n + dst
    pos = torch.searchsorted(keys, key.flatten()).clamp_(max=len(keys) - 1).view_as(key)
    return keys[pos] == key


def _row_lookup(values: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise membership: is ``values[r, w]`` in ``table[r]`` (distinct entries), and where.

    Returns ``(found (c, W) bool, position (c, W) long)``: the column of ``table`` holding
    the value (meaningful where found).
    """
    sorted_table, perm = table.sort(dim=1)  # (c, L)
    pos = torch.searchsorted(sorted_table, values).clamp_(max=table.shape[1] - 1)  # (c, W)
    found = sorted_table.gather(1, pos) == values
    return found, perm.gather(1, pos)


def _reciprocal_mask(
    nbr: torch.Tensor, dist: torch.Tensor, keys: torch.Tensor, outside: torch.Tensor, k: int, rows: torch.Tensor
) -> torch.Tensor:
    """(c, k + 1) bool: is row sample x among the k nearest of its p-th neighbour j?

    For a database sample x this is list membership (``keys`` from :func:`_edge_keys`). A
    sample outside the database attaches to the fixed database lists: it counts as a
    neighbour of j when it would rank before j's k-th neighbour, by (distance, index).
    Position 0 (x itself) is always reciprocal.
    """
    cand = nbr[rows, : k + 1]  # (c, k+1) neighbours j of each x
    member = _has_edge(keys, cand, rows[:, None].expand_as(cand), len(nbr))  # x in N_k(j)
    d_xj = dist[rows, : k + 1]  # (c, k+1) distance x -> j (= j -> x)
    d_kth, n_kth = dist[cand, k], nbr[cand, k]  # (c, k+1) j's k-th neighbour
    beats = (d_xj < d_kth) | ((d_xj == d_kth) & (rows[:, None] < n_kth))
    mask = torch.where(outside[rows, None], beats, member)
    mask[:, 0] = True
    return mask


def reciprocal_knn_batches(
    embeddings: torch.Tensor,
    database: torch.Tensor | None = None,
    k1: int = 30,
    batch_size: int = 7,
    alpha: float = 2 / 3,
    strict_overlap: bool = False,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """A reciprocal k-NN batch around every sample (paper Supp. C.3), all samples at once.

    For a sample x, with ``N_k(j)`` = j followed by its k nearest database samples
    (:func:`knn_graph`) and ``k2 = round(k1 / 2)``:

    1. ``R(x) = {j in N_k1(x) : x in N_k1(j)}`` (x included);
    2. for every ``c in R(x)``: ``R2(c) = {j in N_k2(c) : c in N_k2(j)}``; if
       ``|R2(c) & R(x)| >= alpha |R2(c)|`` (``>`` with ``strict_overlap``), add ``R2(c)``;
    3. the union, ordered by distance to x (x first, ties by index), truncated to
       ``batch_size``; if it is smaller, x's nearest samples not yet in it fill it up.

    Samples outside the database (In-Shop queries) build their batch from database samples:
    their neighbours are database samples, and they join a database sample's list when they
    would rank before its k-th neighbour (they never displace anything, so database lists do
    not depend on the query). Everything is vectorised over chunks of samples.

    Args:
        embeddings: (N, D) features (L2-normalised at test time).
        database: (N,) bool, the samples batches draw from (the gallery); default all.
        k1: reciprocal neighbourhood size (clamped to database size - 1).
        batch_size: samples per batch (clamped to the database size).
        alpha: expansion overlap fraction.
        strict_overlap: ``>`` instead of the paper's ``>=`` in the overlap test.
        chunk_size: samples processed together in the expansion step.

    Returns:
        (N, batch_size) int64 sample indices; column 0 is the sample itself.
    """
    if database is None:
        database = torch.ones(len(embeddings), dtype=torch.bool, device=embeddings.device)
    emb, database = _check_embeddings(embeddings, database)
    n, device = len(emb), emb.device
    m = int(database.sum())
    if m < 2:
        raise ValueError(f"Reciprocal k-NN batches need at least 2 database (gallery) samples; got {m}.")
    if k1 < 1 or batch_size < 1 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Need k1 >= 1, batch_size >= 1 and 0 <= alpha <= 1; got {k1}, {batch_size}, {alpha}.")
    k1 = min(k1, m - 1)
    batch_size = min(batch_size, m)
    k2 = min(round(k1 / 2), k1)
    kk = max(k1, batch_size - 1)  # fill-up candidates come from the same lists
    nbr, dist = _knn_graph(emb, database, kk)  # (N, kk+1)
    outside = ~database
    out = torch.empty(n, batch_size, dtype=torch.long, device=device)
    # R2 of every sample depends only on the sample (and, outside the database, on itself).
    all_rows = torch.arange(n, device=device)
    keys1, keys2 = _edge_keys(nbr, k1), _edge_keys(nbr, k2)
    mask2 = torch.cat([_reciprocal_mask(nbr, dist, keys2, outside, k2, r) for r in all_rows.split(chunk_size)])
    for rows in all_rows.split(chunk_size):
        mask1 = _reciprocal_mask(nbr, dist, keys1, outside, k1, rows)  # (c, k1+1): R(x) over N_k1(x)
        out[rows] = _batches_for_rows(emb, nbr, dist, outside, mask1, mask2, rows, k1, k2, batch_size, alpha,
                                      strict_overlap)
    return out


def _batches_for_rows(
    emb: torch.Tensor,
    nbr: torch.Tensor,
    dist: torch.Tensor,
    outside: torch.Tensor,
    mask1: torch.Tensor,
    mask2: torch.Tensor,
    rows: torch.Tensor,
    k1: int,
    k2: int,
    batch_size: int,
    alpha: float,
    strict: bool,
) -> torch.Tensor:
    """Steps 2-3 of :func:`reciprocal_knn_batches` for a chunk of samples -> (c, batch_size).

    Ordering the expanded set E by distance to x needs no new distance: x's own list
    ``N(x)`` is sorted by (distance, index), so E's members in it come first, in list order,
    and every member outside it is farther than the whole list. Distances are computed only
    for rows whose list holds fewer than ``batch_size`` members of E.
    """
    c, device = rows.numel(), emb.device
    forward = nbr[rows, : k1 + 1]  # (c, k1+1)
    # R2(c) of every neighbour c, plus x itself when it joins c's list from outside the database.
    lists2 = nbr[forward, : k2 + 1]  # (c, k1+1, k2+1)
    in2 = mask2[forward]  # (c, k1+1, k2+1)
    pos = torch.arange(k1 + 1, device=device)
    d_xc = dist[rows, : k1 + 1]  # (c, k1+1)
    d_kth, n_kth = dist[forward, k2], nbr[forward, k2]  # c's k2-th neighbour
    x_joins = (pos > 0) & (pos <= k2) & outside[rows, None]  # c among x's first k2 ...
    x_joins &= (d_xc < d_kth) | ((d_xc == d_kth) & (rows[:, None] < n_kth))  # ... and x before c's k2-th
    # Eq. 7: |R2(c) & R(x)| >= alpha |R2(c)|; R(x) is the reciprocal part of N_k1(x).
    found, where = _row_lookup(lists2.flatten(1), forward)  # (c, W), W = (k1+1)(k2+1)
    in_r = (found & mask1.gather(1, where)).view_as(in2)
    count = (in2 & in_r).sum(-1) + x_joins  # x is always in R(x)
    size = in2.sum(-1) + x_joins
    bound = alpha * size.double()
    grow = count.double() > bound + _OVERLAP_TOLERANCE if strict else count.double() >= bound - _OVERLAP_TOLERANCE
    grow &= mask1  # (c, k1+1): c is reciprocal and R2(c) is added
    grown = torch.where(in2 & grow[..., None], lists2, torch.full_like(lists2, -1)).flatten(1)  # (c, W), -1 = none
    # Which entries of x's list are in E = R(x) + the grown R2 sets.
    near = nbr[rows]  # (c, K+1), nearest first
    kk1 = near.shape[1]
    found, where = _row_lookup(grown, near)  # (c, W)
    in_e = torch.zeros(c, kk1, dtype=torch.uint8, device=device).scatter_reduce_(
        1, where, found.to(torch.uint8), "amax"
    ).bool()
    in_e[:, : k1 + 1] |= mask1
    # E's members in list order, then the fill-up (the rest of the list, in order).
    order = (~in_e).long() * kk1 + torch.arange(kk1, device=device)  # (c, K+1)
    out = near.gather(1, order.argsort(dim=1)[:, :batch_size])
    far = (grown >= 0) & ~found  # (c, W) members of E beyond x's list
    short = ((in_e.sum(1) < batch_size) & far.any(1)).nonzero().flatten()
    if short.numel():  # too few members of E in the list, more beyond it: order those by distance
        out[short] = _batches_beyond_list(emb, rows[short], near[short], in_e[short], grown[short], far[short],
                                          batch_size)
    return out


def _batches_beyond_list(
    emb: torch.Tensor,
    rows: torch.Tensor,
    near: torch.Tensor,
    in_e: torch.Tensor,
    grown: torch.Tensor,
    far: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Batches of rows whose list holds fewer than ``batch_size`` members of E.

    Order: E's members in the list (list order), E's members beyond it (``far``) by
    (distance, index), then the list's other entries (list order); the first ``batch_size``.
    """
    c, kk1, n, device = rows.numel(), near.shape[1], len(emb), emb.device
    x_loc, col = far.nonzero(as_tuple=True)
    pair = (x_loc * n + grown[x_loc, col]).unique()  # sorted by row, then index; no duplicates
    x_far, s_far = pair // n, pair % n
    x = rows[x_far]
    d_far = emb[x].pow(2).sum(1) + emb[s_far].pow(2).sum(1) - 2 * (emb[x] * emb[s_far]).sum(1)
    # Lexicographic (row, group, list position, distance, index) with group 0 = E in the
    # list, 1 = E beyond it, 2 = the rest of the list.
    row_id = torch.cat([torch.arange(c, device=device).repeat_interleave(kk1), x_far])
    group = torch.cat([torch.where(in_e, 0, 2).flatten(), torch.ones_like(x_far)])
    position = torch.cat([torch.arange(kk1, device=device).repeat(c), torch.zeros_like(x_far)])
    distance = torch.cat([torch.zeros(c * kk1, device=device), d_far])
    sample = torch.cat([near.flatten(), s_far])
    order = sample.argsort(stable=True)
    order = order[distance[order].argsort(stable=True)]
    key = (row_id * 3 + group) * kk1 + position
    order = order[key[order].argsort(stable=True)]
    counts = torch.bincount(row_id, minlength=c)  # >= K + 1 >= batch_size per row
    starts = counts.cumsum(0) - counts
    return sample[order][starts[:, None] + torch.arange(batch_size, device=device)]
