"""A two-layer MLP with an optional skip connection: ``Linear -> SiLU -> Linear (+ x)``.

A projection that is richer than one Linear yet keeps the feature size, for attention's
queries, keys and values or for an embedding head (Context-Refine's CA projections,
supplement A, with the skip connection around the query). Its layers are named ``fc1`` and
``fc2`` (``skip`` says whether the input is added), so that an inference path may apply them
itself (:mod:`benchmark.nn.fused`) and state dicts keep their names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionMLP(nn.Module):
    """Linear -> SiLU -> Linear, optionally plus its input.

    Args:
        dim: input and output size D.
        hidden_dim: width of the hidden layer.
        skip: add the input to the output (``x + MLP(x)``).
    """

    def __init__(self, dim: int, hidden_dim: int, skip: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.silu(self.fc1(x)))  # (..., D)
        return x + y if self.skip else y
