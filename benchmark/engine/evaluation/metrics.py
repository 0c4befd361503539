"""Retrieval metrics for deep metric learning: Recall@K, MAP@R, R-Precision, mAP@k and NMI.

Pure functions on tensors (no Lightning). Conventions, shared by every backend:

* cosine similarity: embeddings are L2-normalised here, so the score is a dot product;
* a query never retrieves itself: it is excluded by its position in the evaluated set (its
  dataset index), not by dropping the first neighbour, which duplicates and ties break;
* ties: among equal scores the gallery item with the lower dataset index ranks first (a
  stable sort by descending score);
* queries without a positive in the gallery are left out of every average and counted in
  ``queries_without_positive``.

This module is the metrics' public face: callers import from here, and each metric lives in a
focused module of :mod:`benchmark.engine.evaluation`:

* :mod:`~benchmark.engine.evaluation.search`: :func:`retrieval_metrics`, the exact search of
  the ranks of each query's positives (its docstring describes the algorithm), and
  :func:`default_chunk_size`;
* :mod:`~benchmark.engine.evaluation.rankings`: :func:`ranked_list_metrics` (a method's neighbour
  lists), :class:`QueryRankings` with :func:`query_rankings` and :func:`ranked_list_rankings`
  (each query's top of the list, for the figures);
* :mod:`~benchmark.engine.evaluation.clustering`: :func:`nmi` (faiss k-means) with
  :func:`nmi_from_assignments`, and the collapse check :func:`count_duplicate_rows`;
* :mod:`~benchmark.engine.evaluation.conventions`: the conventions above in code (input checks,
  the exact order keys of the tie rule, ranks -> metrics), shared by the others.
"""

from benchmark.engine.evaluation.clustering import count_duplicate_rows, nmi, nmi_from_assignments
from benchmark.engine.evaluation.rankings import (
    QueryRankings,
    query_rankings,
    ranked_list_metrics,
    ranked_list_rankings,
)
from benchmark.engine.evaluation.search import default_chunk_size, retrieval_metrics

__all__ = [
    "retrieval_metrics", "ranked_list_metrics", "nmi", "default_chunk_size", "count_duplicate_rows",
    "QueryRankings", "query_rankings", "ranked_list_rankings", "nmi_from_assignments",
]
