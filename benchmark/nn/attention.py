"""Scaled dot-product attention, written once for every method.

:func:`attend` works on head-split tensors and :class:`Attention` splits and merges the
heads of already projected queries, keys and values; the methods keep their own projections,
norms and skip connections around it. Two paths compute the same function:

* the fast path, :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA: fused
  kernels on GPU and CPU), used for training and inference;
* the explicit path (``softmax(q k^T * scale) v`` with matrix products), used only when the
  attention weights are asked for, since SDPA does not return them.

Options shared by both paths:

* ``key_mask``: (..., S) bool, ``True`` for the keys a query may attend to (key padding);
* ``attn_mask``: (..., L, S) bool (optionally with a head dim), ``True`` = may attend;
* ``zero_logit``: one extra logit fixed at 0 in every softmax, ``exp(s_j) / (1 + sum_j
  exp(s_j))`` (the official Intra-Batch code's attention): a null key whose logit is 0 for
  every query and whose value is zero, so it only takes probability mass away;
* any number of heads (``num_heads`` of :class:`Attention`).

A query with every key masked and no ``zero_logit`` has no distribution to attend with; its
output is undefined (NaN), so callers keep at least one key per query.

This module imports nothing from the project (torch only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "attend", "attention_weights", "merge_heads", "split_heads"]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., L, H * E) -> (..., H, L, E)."""
    return x.unflatten(-1, (num_heads, x.shape[-1] // num_heads)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., H, L, E) -> (..., L, H * E)."""
    return x.transpose(-3, -2).flatten(-2)


def _combined_mask(
    key_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, zero_logit: bool
) -> torch.Tensor | None:
    """One bool mask broadcastable to (..., H, L, S [+ 1]); ``None`` when nothing is masked."""
    mask = None
    if key_mask is not None:
        mask = key_mask.bool()[..., None, None, :]  # (..., S) -> (..., 1, 1, S)
    if attn_mask is not None:
        am = attn_mask.bool()
        mask = am if mask is None else mask & am
    if mask is not None and zero_logit:  # the null key is never masked
        mask = torch.cat([mask, mask.new_ones(mask.shape[:-1] + (1,))], dim=-1)  # (..., S + 1)
    return mask


def _with_null_key(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append a zero key (logit exactly 0 for every query) and a zero value: (..., S + 1, E)."""
    k = torch.cat([k, k.new_zeros(k.shape[:-2] + (1, k.shape[-1]))], dim=-2)  # (..., S + 1, E)
    v = torch.cat([v, v.new_zeros(v.shape[:-2] + (1, v.shape[-1]))], dim=-2)  # (..., S + 1, Ev)
    return k, v


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    zero_logit: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit attention weights ``softmax(q k^T * scale)`` over the keys.

    Args:
        q: (..., H, L, E) queries.
        k: (..., H, S, E) keys (leading dims broadcast against ``q``'s).
        key_mask: (..., S) bool, ``True`` = the key takes part.
        attn_mask: bool, broadcastable to (..., H, L, S), ``True`` = the pair takes part.
        zero_logit: add one logit fixed at 0 to every softmax (its weight is not returned).
        scale: logit scale; default ``1 / sqrt(E)``.

    Returns:
        (..., H, L, S) weights, computed in at least float32 and returned in ``q``'s dtype
        promoted with ``k``'s; a row sums to 1 (to less than 1 with ``zero_logit``).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., H, L, E) @ (..., H, E, S) -> (..., H, L, S)
    if zero_logit:
        scores = torch.cat([scores, scores.new_zeros(scores.shape[:-1] + (1,))], dim=-1)  # (..., H, L, S + 1)
    mask = _combined_mask(key_mask, attn_mask, zero_logit)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
    return weights[..., :-1] if zero_logit else weights  # drop the null key's column


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    zero_logit: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(q k^T * scale [, 0]) v`` on head-split tensors.

    Args:
        q: (..., H, L, E) queries.
        k: (..., H, S, E) keys; leading dims broadcast against ``q``'s (e.g. one key set
            shared by every batch entry: (1, H, S, E)).
        v: (..., H, S, Ev) values (the same leading dims as ``k``).
        key_mask: (..., S) bool, ``True`` = the key takes part (key padding).
        attn_mask: bool, broadcastable to (..., H, L, S), ``True`` = the pair takes part.
        zero_logit: one extra logit fixed at 0 in every softmax (a null key with a zero value).
        scale: logit scale; default ``1 / sqrt(E)``.
        dropout_p: dropout on the attention weights (pass 0 outside training).
        return_weights: also return the (..., H, L, S) weights (before dropout); this takes
            the explicit path, otherwise SDPA computes the output.

    Returns:
        ``(output (..., H, L, Ev), weights or None)``.
    """
    if return_weights:
        weights = attention_weights(q, k, key_mask, attn_mask, zero_logit, scale)  # (..., H, L, S)
        dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
        return dropped.to(v.dtype) @ v, weights  # (..., H, L, S) @ (..., H, S, Ev) -> (..., H, L, Ev)
    if zero_logit:
        k, v = _with_null_key(k, v)  # (..., H, S + 1, E), (..., H, S + 1, Ev)
    mask = _combined_mask(key_mask, attn_mask, zero_logit)
    if q.ndim != k.ndim:  # SDPA broadcasts leading dims of equal rank
        k = k.reshape((1,) * (q.ndim - k.ndim) + k.shape)
        v = v.reshape((1,) * (q.ndim - v.ndim) + v.shape)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out, None


class Attention(nn.Module):
    """Multi-head attention of projected queries over projected keys and values (no parameters).

    Splits the last dim of ``q``, ``k`` and ``v`` into ``num_heads`` slices, attends per head
    with :func:`attend` and concatenates the heads again. The caller owns the projections.

    Args:
        num_heads: H; the feature sizes must be divisible by it.
        zero_logit: one extra logit fixed at 0 in every softmax (official Intra-Batch code).
        dropout: dropout on the attention weights in training mode.
        scale: logit scale; default ``1 / sqrt(E)`` with ``E`` the per-head size.
    """

    def __init__(self, num_heads: int = 1, zero_logit: bool = False, dropout: float = 0.0, scale: float | None = None):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1; got {num_heads}.")
        self.num_heads, self.zero_logit, self.dropout, self.scale = num_heads, zero_logit, dropout, scale

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, zero_logit={self.zero_logit}, dropout={self.dropout}"

    def weights(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(..., L, H * E) queries, (..., S, H * E) keys -> (..., H, L, S) attention weights."""
        h = self.num_heads
        return attention_weights(split_heads(q, h), split_heads(k, h), key_mask, attn_mask, self.zero_logit, self.scale)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend and merge the heads.

        Args:
            q: (..., L, H * E) projected queries.
            k: (..., S, H * E) projected keys (leading dims broadcast against ``q``'s).
            v: (..., S, H * Ev) projected values.
            key_mask: (..., S) bool, ``True`` = the key takes part.
            attn_mask: bool, broadcastable to (..., H, L, S), ``True`` = the pair takes part.
            return_weights: also return the weights (explicit path).

        Returns:
            ``(output (..., L, H * Ev), weights (..., H, L, S) or None)``.
        """
        h = self.num_heads
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.shape[-1] % h:
                raise ValueError(f"The size {x.shape[-1]} of {name} is not divisible by num_heads={h}.")
        out, weights = attend(
            split_heads(q, h),  # (..., H, L, E)
            split_heads(k, h),  # (..., H, S, E)
            split_heads(v, h),  # (..., H, S, Ev)
            key_mask,
            attn_mask,
            self.zero_logit,
            self.scale,
            self.dropout if self.training else 0.0,
            return_weights,
        )
        return merge_heads(out), weights  # (..., L, H * Ev)
