"""Classifier heads that look at a context: a query embedding attends over a set, then a linear layer.

A plain linear classifier sees one embedding; a cross-attention classifier first pools a set of
context embeddings (neighbours retrieved from a database, a padded set with a mask) by its
attention to them, so that its cross-entropy trains the encoder through the similarities
(DMCAC's cross-attention classification, Trivedy & Latecki Eq. 16-19). The attention itself is
:class:`benchmark.nn.attention.Attention`; only torch is imported besides.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmark.nn.attention import Attention


class CrossAttentionClassifier(nn.Module):
    """One query embedding attends over context embeddings, then a linear classifier (DMCAC's Eq. 16-18).

    ``z' = softmax((W_q z)(W_k Z_S)^T / (sqrt(F) t)) W_v Z_S`` and ``logits = W_c z'``; single
    head, ``W_q, W_k, W_v`` are F x F as in the paper (no bias unless ``attention_bias``); ``t``
    is ``attention_temperature`` (1: the paper's Eq. 17); the attention is
    :class:`benchmark.nn.Attention`.
    """

    def __init__(
        self, dim: int, num_classes: int, attention_bias: bool = False, classifier_bias: bool = True,
        attention_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=attention_bias)
        self.k = nn.Linear(dim, dim, bias=attention_bias)
        self.v = nn.Linear(dim, dim, bias=attention_bias)
        self.classifier = nn.Linear(dim, num_classes, bias=classifier_bias)
        self.scale = dim**-0.5 / attention_temperature
        self.attention = Attention(1, scale=self.scale)  # no parameters

    def forward(
        self,
        views: torch.Tensor,
        database: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_attention: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, A, F) views over (B, T, F) or shared (T, F) entries -> (logits (B, A, C), attention (B, A, T)).

        ``mask`` (B, T): ``True`` for real entries (padded ones get attention exactly 0). Without
        ``return_attention`` the attention is computed by SDPA and ``None`` is returned for it.
        """
        q, k, v = self.q(views), self.k(database), self.v(database)  # (B, A, F), (B, T, F) or (T, F)
        attended, weights = self.attention(q, k, v, key_mask=mask, return_weights=return_attention)  # (B, A, F)
        return self.classifier(attended), (weights[..., 0, :, :] if weights is not None else None)  # (B, A, T)
