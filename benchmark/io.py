"""Conventions shared by every layer: where data lives, atomic writes, and the console.

A leaf module (standard library and rich). Everything the project writes that another process
or a later run reads (results JSON, status files, checkpoints, embedding caches) goes
through :func:`atomic_path`, so that a reader never sees a half-written file, even when a
run is killed mid-write.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

ENV_DATA_ROOT = "DML_BENCHMARK_DATA"


def default_data_root() -> Path:
    """Where datasets and caches live unless ``root`` is given: ``$DML_BENCHMARK_DATA``
    (default ``~/.cache/dml-benchmark``)."""
    return Path(os.environ.get(ENV_DATA_ROOT) or Path.home() / ".cache" / "dml-benchmark").expanduser()


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The rename is atomic on POSIX (same folder, same file system). On an exception the
    temporary file is removed and ``path`` is untouched. ``fsync`` flushes the file to disk
    before the rename (for large caches that must survive a power loss).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that readers never see a partial file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def console() -> Console:
    """The console tables are printed on. Outside a terminal (a log file, a pipe, CI) rich would
    assume 80 columns and cut names short; tables there get room for their widest cell."""
    columns = os.environ.get("COLUMNS", "")
    return Console() if sys.stdout.isatty() else Console(width=max(200, int(columns) if columns.isdigit() else 0))
