"""The conventions every metric shares, in code: input checks, exact order keys, ranks -> metrics.

The metrics' conventions (:mod:`benchmark.engine.evaluation.metrics`: cosine similarity of
L2-normalised embeddings, self-exclusion by dataset index, ties to the lower dataset index,
queries without a positive left out) are implemented once, here, for the exact search of
:mod:`~benchmark.engine.evaluation.search` and the ranked lists and per-query rankings of
:mod:`~benchmark.engine.evaluation.rankings`: the checks and ordering of the inputs
(:func:`_prepare`), the integer keys that make the tie rule exact (:func:`_rank_key`), the metric
sums over the ranks of the positives (:func:`_metric_sums`) and the fp32 products every backend
ranks alike with (:func:`_exact_fp32_matmul`). A module of its own because both backends import
it and neither owns it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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


# ---------------------------------------------------------------------------- fp32 products
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
