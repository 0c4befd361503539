"""Metrics of a method's ranked lists, and what each query's ranking looks like.

:func:`ranked_list_metrics` scores neighbour lists a method returns (its refinement) with the
metrics of :func:`~benchmark.engine.evaluation.search.retrieval_metrics`; :class:`QueryRankings`
(:func:`query_rankings`, :func:`ranked_list_rankings`) holds each query's top of the list and its
first positive, which the figure layer draws (:mod:`benchmark.engine.figures`). Apart from the
exact search because neither needs it: both read whole rows of scores or given lists, on the
shared conventions (:mod:`~benchmark.engine.evaluation.conventions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmark.core.contracts import RankedLists
from benchmark.engine.evaluation.conventions import (
    _NO_RANK,
    _check_ks,
    _exact_fp32_matmul,
    _finish,
    _metric_sums,
    _no_positive_error,
    _positives_per_query,
    _prepare,
    _prepare_roles,
    _rank_key,
    _resolve_device,
)


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
