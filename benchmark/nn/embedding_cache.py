"""Precomputed embeddings on disk, keyed by the model, the dataset split and the transform.

A method that works on the embeddings of a frozen model (Context-Refine's stage 1, and any
post-processing method like it) embeds each split once; later runs read the file back. The key
identifies everything that changes the numbers, so that a stale file is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.core.io import atomic_path, default_data_root


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Identity of a checkpoint file without reading it: resolved path, size, mtime (ns)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def module_fingerprint(module: nn.Module) -> str:
    """Content hash of a module's state (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d buffers (BatchNorm counters) too
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def embedding_cache_key(
    source: dict[str, Any] | str,
    dataset: str,
    root: str,
    paths: Sequence[str],
    transform: str,
    precision: str = "32",
) -> str:
    """Hex key of one (model, dataset split, evaluation transform, precision) embedding set.

    The split is identified by its files (``paths`` in dataset-index order), not its name: a
    changed split (another holdout seed) gets another key, and the paper protocol's validation
    and test splits, the same files, share one entry. ``transform`` is the evaluation
    transform's ``repr``; ``precision`` the trainer's (bf16 autocast changes the embeddings).
    """
    paths_digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    payload = {
        "version": 1,
        "source": source,
        "dataset": dataset,
        "root": root,
        "num_samples": len(paths),
        "paths": paths_digest,
        "transform": transform,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


class EmbeddingCache:
    """Precomputed embeddings on disk: one ``<key>.pt`` per (model, split, transform).

    Files are written atomically (:func:`benchmark.core.io.atomic_path`, flushed to disk), so a
    reader sees either nothing or a complete file; an interrupted write leaves at most a hidden
    ``.tmp`` file that is never read. :meth:`load` validates what it reads (the key stored
    inside, the shape, finiteness) and treats anything else as absent, with a warning.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = (
            Path(directory).expanduser() if directory else default_data_root() / "embedding_cache"
        )

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def load(self, key: str, rows: int, dim: int | None = None) -> torch.Tensor | None:
        """The cached (rows, dim) float32 embeddings of ``key``, or ``None`` (absent or invalid)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign file: recompute, do not trust it
            warnings.warn(f"Embedding cache {path} is unreadable ({err}); recomputing it.", stacklevel=2)
            return None
        emb = entry.get("embeddings") if isinstance(entry, dict) else None
        problem = None
        if not isinstance(entry, dict) or entry.get("key") != key:
            problem = "it was written for another key"
        elif not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != rows:
            problem = f"it holds shape {tuple(getattr(emb, 'shape', ()))}, expected ({rows}, D)"
        elif dim is not None and emb.shape[1] != dim:
            problem = f"it holds {emb.shape[1]}-d embeddings, expected {dim}-d"
        elif not bool(torch.isfinite(emb).all()):
            problem = "it contains NaN or inf"
        if problem:
            warnings.warn(
                f"Embedding cache {path} is stale or mismatched ({problem}); recomputing it.", stacklevel=2
            )
            return None
        return emb.float()

    def save(self, key: str, embeddings: torch.Tensor, meta: dict[str, Any] | None = None) -> Path:
        """Write ``embeddings`` (N, D) under ``key`` atomically; returns the file's path."""
        path = self.path(key)
        entry = {"key": key, "embeddings": embeddings.detach().float().cpu().contiguous(), "meta": meta or {}}
        with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
            torch.save(entry, f)
        return path
