"""Evaluation: one Lightning callback for every method, and the metrics behind it.

``RetrievalEvaluator`` gathers evaluation embeddings (DDP included), applies a method's
optional transductive ``refine`` step and reports Recall@K, MAP@R, R-Precision, mAP@k and
NMI. The metric functions are plain tensor functions usable without Lightning.
See docs/evaluation.md for the conventions (cosine similarity, self-exclusion by dataset
index, tie policy, queries without positives).
"""

from benchmark.engine.evaluation.callback import Evaluation, RetrievalEvaluator
from benchmark.engine.evaluation.metrics import nmi, ranked_list_metrics, retrieval_metrics

__all__ = ["RetrievalEvaluator", "Evaluation", "retrieval_metrics", "ranked_list_metrics", "nmi"]
