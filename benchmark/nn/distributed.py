"""Gathering per-rank tensors of different lengths, and undoing DistributedSampler padding.

``torch.distributed.all_gather`` needs equal shapes on every rank, and Lightning's
``all_gather`` does too; evaluation shards differ by one sample when the set does not divide
evenly, and the sampler pads with duplicates. torchmetrics gathers uneven shapes; these
helpers then keep one row per dataset index, so a DDP result equals a single-process one
exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (n_r, ...) from every rank along dim 0, in rank order.

    torchmetrics' ``gather_all_tensors`` pads to the largest shape, gathers and trims; what
    it lacks, and this module adds, is the dataset-index de-duplication below.
    """
    if not is_distributed():
        return tensor
    return torch.cat(gather_all_tensors(tensor.contiguous()))


def dedup_by_index(indices: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sort rows by dataset index and keep the first row of each index.

    Returns ``(unique_indices, *tensors_reordered)``; rows share dim 0 with ``indices``.
    """
    order = torch.argsort(indices, stable=True)  # (N,)
    sorted_idx = indices[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    rows = order[keep]
    return (indices[rows], *(t[rows] for t in tensors))


def gather_by_index(indices: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather rows from every rank and return them de-duplicated, ordered by dataset index."""
    gathered = [all_gather_uneven(indices)] + [all_gather_uneven(t) for t in tensors]
    return dedup_by_index(*gathered)
