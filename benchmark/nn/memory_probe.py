"""How much memory a forward pass keeps for its backward, and how much the device has free.

For a pre-flight check that stops a run with a clear message before it runs out of memory:
DMCAC's ``full_grad`` retrieval embeds its whole database with gradient at every step and
estimates, before training, whether one step fits. Any method whose step size is set by the
data (a memory bank re-embedded with gradient, a large graph batch) can use the same probes.
Only torch is imported.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def saved_activation_bytes(module: nn.Module, images: torch.Tensor, forward: Any = None) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one forward.

    Counts each saved storage once, leaving out the parameters' and the input's storages (they
    exist anyway). ``forward(images)`` defaults to ``module(images)``; its output is discarded.
    """
    exclude = {p.untyped_storage().data_ptr() for p in module.parameters()}
    exclude.add(images.untyped_storage().data_ptr())
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = (forward or module)(images)
    del out
    return sum(storages.values())


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory for new tensors: CUDA free + cached-but-unused, or the OS's MemAvailable (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        with contextlib.suppress(OSError, ValueError):
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    return None
