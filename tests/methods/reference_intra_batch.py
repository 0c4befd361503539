"""Per-query reference of Intra-Batch MPN's reciprocal k-NN test batches (paper Supp. C.3).

A literal, slow transcription used by ``tests/methods/test_intra_batch.py`` to check the
vectorised :func:`methods.intra_batch.reciprocal_knn_batches`. It lives with the tests (a
copy of the reference that ``methods/intra_batch_perf.py`` times against), so that the tests
do not depend on a performance-measurement module.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
import torch

_OVERLAP_TOLERANCE = 1e-9  # the same tolerance as the vectorised implementation


class ReferenceReciprocalBatches:
    """A literal, per-query transcription of the reciprocal k-NN batch (paper Supp. C.3).

    Slow on purpose and independent of the vectorised code: neighbour lists come from sorting
    full rows of float64 squared distances by (distance, index). It defines the semantics the
    vectorised :func:`~methods.intra_batch.reciprocal_knn_batches` must reproduce exactly:

    * ``N_k(j)``: j, then its k nearest other database samples;
    * a query outside the database sees database lists with itself attached: it joins
      ``N_k(j)`` when it ranks before j's k-th neighbour (nothing is displaced);
    * ``R_k(c) = {g in N_k(c) : c in N_k(g)}``; the batch of query q is ``R_k1(q)`` plus
      every ``R_k2(c)``, ``c in R_k1(q)``, ``k2 = round(k1 / 2)``, whose overlap with
      ``R_k1(q)`` is at least ``alpha`` of its size; sorted by distance to q (q first, ties by
      index), cut to ``batch_size``, filled up with q's nearest samples not yet in it.
    """

    def __init__(
        self,
        embeddings: torch.Tensor | np.ndarray,
        database: torch.Tensor | np.ndarray | None = None,
        k1: int = 30,
        batch_size: int = 7,
        alpha: float = 2 / 3,
        strict_overlap: bool = False,
    ) -> None:
        emb = torch.as_tensor(embeddings).detach().cpu().double()
        n = len(emb)
        in_db = np.ones(n, dtype=bool) if database is None else np.asarray(torch.as_tensor(database).cpu(), dtype=bool)
        self.emb, self.sq = emb, emb.pow(2).sum(1)
        self.in_db = in_db
        self.db = np.flatnonzero(in_db)
        m = len(self.db)
        self.k1 = min(k1, m - 1)
        self.batch_size = min(batch_size, m)
        self.k2 = min(round(self.k1 / 2), self.k1)
        self.alpha, self.strict = alpha, strict_overlap
        self._lists: dict[tuple[int, int], list[int]] = {}
        self._rows: dict[int, np.ndarray] = {}
        # How often each branch of the algorithm was taken (tests check they are all exercised).
        self.stats: collections.Counter[str] = collections.Counter()

    def distances(self, i: int) -> np.ndarray:
        """Squared Euclidean distances from sample i to every sample (float64)."""
        if i not in self._rows:
            self._rows[i] = (self.sq + self.sq[i] - 2 * (self.emb @ self.emb[i])).numpy()
        return self._rows[i]

    def neighbours(self, j: int, k: int) -> list[int]:
        """j, then its k nearest other database samples by (distance, index)."""
        if (j, k) not in self._lists:
            d = self.distances(j)
            others = self.db[self.db != j]
            order = np.lexsort((others, d[others]))  # by distance, then index
            self._lists[(j, k)] = [j] + others[order[:k]].tolist()
        return self._lists[(j, k)]

    def seen_from(self, j: int, k: int, query: int) -> list[int]:
        """``N_k(j)`` during the batch of ``query``: a query outside the database may attach."""
        nearest = self.neighbours(j, k)
        if j != query and not self.in_db[query]:
            last = nearest[-1]
            d = self.distances(j)
            if (d[query], query) < (d[last], last):
                self.stats["query_attached"] += 1
                return nearest + [query]
        return nearest

    def reciprocal(self, j: int, k: int, query: int) -> list[int]:
        """``R_k(j) = {g in N_k(j) : j in N_k(g)}``."""
        return [g for g in self.seen_from(j, k, query) if j in self.seen_from(g, k, query)]

    def batch(self, query: int) -> list[int]:
        """The reciprocal k-NN batch of ``query`` (query first)."""
        r1 = self.reciprocal(query, self.k1, query)
        expanded = set(r1)
        for c in r1:
            r2 = self.reciprocal(c, self.k2, query)
            overlap = len(set(r2) & set(r1))
            if self.strict:
                grows = overlap > self.alpha * len(r2) + _OVERLAP_TOLERANCE
            else:
                grows = overlap >= self.alpha * len(r2) - _OVERLAP_TOLERANCE
            if grows:
                self.stats["expanded"] += bool(set(r2) - expanded)
                expanded |= set(r2)
            else:
                self.stats["not_expanded"] += 1
        d = self.distances(query)
        batch = sorted(expanded, key=lambda g: (g != query, d[g], g))[: self.batch_size]
        nearest = self.neighbours(query, max(self.k1, self.batch_size - 1))
        self.stats["beyond_list"] += bool(set(batch) - set(nearest))
        for g in nearest:
            if len(batch) == self.batch_size:
                break
            if g not in expanded:
                self.stats["filled"] += 1
                batch.append(g)
        self._rows.clear()  # distance rows are per query; neighbour lists are kept
        return batch

    def all_batches(self, queries: Sequence[int] | None = None) -> torch.Tensor:
        """(Q, batch_size) batches of the given queries (default: every sample)."""
        queries = range(len(self.emb)) if queries is None else queries
        return torch.tensor([self.batch(int(q)) for q in queries], dtype=torch.long)


def synthetic_sop_embeddings(num_samples: int = 60502, num_classes: int = 11316, dim: int = 512,
                             noise: float = 0.8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised clustered embeddings: random class centres plus Gaussian noise of norm ~``noise``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(num_classes), torch.randint(num_classes, (num_samples - num_classes,), generator=gen)])
    labels = labels[torch.randperm(num_samples, generator=gen)]
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    emb = centres[labels] + torch.randn(num_samples, dim, generator=gen) * (noise / dim**0.5)
    return torch.nn.functional.normalize(emb, dim=1), labels
