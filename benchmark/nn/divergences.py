"""Divergences between the similarity distributions of several views of one sample.

A consistency loss that asks the views (augmentations) of a sample to agree on *where* they
are in a set of context embeddings compares distributions, not embeddings. Written for DMCAC's
``L_frob`` (Trivedy & Latecki, Eq. 9-13), usable by any such loss:

* :func:`similarity_log_probs`: each view's log-softmax over its context entries (a shared set
  or a padded per-sample set with a mask: padded entries get probability exactly 0);
* :func:`js_divergence_matrix`: the A x A matrix of pairwise Jensen-Shannon divergences, in
  the log domain (finite values and gradients where probabilities are 0);
* :func:`frobenius_lower`: the Frobenius norm of its strict lower triangle (each pair once).

Only torch is imported.
"""

from __future__ import annotations

import math

import torch


def _masked_value(dtype: torch.dtype) -> float:
    """A finite "minus infinity": exp() gives exactly 0, while log-domain arithmetic on it stays
    finite, so padded entries contribute 0 to the JS sums with finite (zero) gradients."""
    return torch.finfo(dtype).min / 4


def similarity_log_probs(
    views: torch.Tensor, database: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """``log softmax(Z_A Z_S^T / temperature)`` over the database entries (DMCAC's Eq. 9-10).

    Each of a query's A views gets a distribution over its T context entries, by similarity.

    Args:
        views: (B, A, F) L2-normalised view embeddings.
        database: (B, T, F) per-query entries, or (T, F) shared by every query (full retrieval).
        mask: (B, T) True for real entries; padded ones get probability exactly 0.

    Returns:
        (B, A, T) log-probabilities (padded entries: a large finite negative number).
    """
    eq = "baf,btf->bat" if database.ndim == 3 else "baf,tf->bat"
    logits = torch.einsum(eq, views, database) / temperature  # (B, A, F) x (B, T, F) -> (B, A, T)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], _masked_value(logits.dtype))
    return logits.log_softmax(dim=-1)


def js_divergence_matrix(log_p: torch.Tensor) -> torch.Tensor:
    """Pairwise Jensen-Shannon divergences between the rows of each query's ``P'`` (DMCAC's Eq. 11-12).

    ``L_ij = (KL(P_i || M_ij) + KL(P_j || M_ij)) / 2`` with ``M_ij = (P_i + P_j) / 2``, in nats.

    Args:
        log_p: (B, A, T) log-probabilities; entries with probability 0 contribute 0.

    Returns:
        (B, A, A) symmetric, zero on the diagonal.
    """
    lp_i = log_p[:, :, None, :]  # (B, A, 1, T)
    lp_j = log_p[:, None, :, :]  # (B, 1, A, T)
    log_m = torch.logaddexp(lp_i, lp_j) - math.log(2.0)  # (B, A, A, T) log of the mixture
    kl_i = (lp_i.exp() * (lp_i - log_m)).sum(dim=-1)  # (B, A, A) KL(P_i || M)
    kl_j = (lp_j.exp() * (lp_j - log_m)).sum(dim=-1)  # (B, A, A) KL(P_j || M)
    return 0.5 * (kl_i + kl_j)


def frobenius_lower(matrix: torch.Tensor) -> torch.Tensor:
    """(B, A, A) -> (B,) Frobenius norm of the strict lower triangle (DMCAC's Eq. 13).

    The gradient at a zero matrix (identical views) is 0, not NaN.
    """
    a = matrix.shape[-1]
    rows, cols = torch.tril_indices(a, a, offset=-1, device=matrix.device)  # the A(A-1)/2 pairs i > j
    return torch.linalg.vector_norm(matrix[:, rows, cols], dim=-1)
