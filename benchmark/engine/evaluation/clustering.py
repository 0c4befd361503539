"""What the metrics report besides the ranking: NMI of a k-means clustering, and the collapse check.

:func:`nmi` (faiss k-means of the L2-normalised embeddings against the labels) and
:func:`count_duplicate_rows` (equal embeddings, the sign of a collapsed model whose scores tie)
look at the embeddings as a whole, not at each query's ranked gallery, so they share nothing
with the search (:mod:`~benchmark.engine.evaluation.search`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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
