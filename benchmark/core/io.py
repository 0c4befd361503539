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

from benchmark.core.errors import UserError

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


def console(stderr: bool = False) -> Console:
    """The console tables are printed on (``stderr``: for notes beside a command's output). Outside a
    terminal (a log file, a pipe, CI) rich would assume 80 columns and cut names short; tables there
    get room for their widest cell."""
    columns = os.environ.get("COLUMNS", "")
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=max(200, int(columns) if columns.isdigit() else 0))


def check_writable(path: str | os.PathLike[str], option: str) -> None:
    """Fail before any work, naming ``option``, when ``path`` cannot be written (its folder is created).

    Raises :class:`benchmark.core.errors.UserError`.
    """
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {target} is a folder; pass a file name.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target.parent / f".{target.name}.probe") as tmp:
            tmp.write_text("")
        (target.parent / f".{target.name}.probe").unlink(missing_ok=True)
    except OSError as err:
        raise UserError(f"Cannot write {option} {target}: {err.strerror or err}. Pass a writable path.") from None


def make_writable_dir(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` (and its parents) and prove it writable by creating and removing a probe file.

    Checked before long work starts (a run folder, a suite's output): a read-only mount or a full disk
    fails here, not at the first checkpoint. Raises the OSError; the caller words it for its option.
    Writing a file is the real test: mkdir succeeds on an existing folder whatever its permissions,
    and os.access can be wrong on network file systems. The pid in the probe's name keeps two
    concurrent commands from removing each other's probe.
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.touch()
    probe.unlink()
    return path


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left in ``folder`` when its writer was killed
    (``.<name>.<pid>.<id>.tmp`` whose process no longer runs on this machine); returns them.

    A checkpoint killed mid-write leaves hundreds of megabytes behind; a live writer's file is kept.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        parts = path.name.rsplit(".", 3)  # [".<name>", "<pid>", "<id>", "tmp"]
        if len(parts) != 4 or not parts[1].isdigit():
            continue
        if pid_alive(int(parts[1])):
            continue  # the writer is still running
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
