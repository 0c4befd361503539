"""Validation before anything runs: every cell's configuration parsed by the run builder's own parser,
and the output folder checked.

A suite of many cells must not discover a misspelt option in its twentieth cell hours after it
started, nor in every cell's fit at once under a launcher. Each distinct configuration is
therefore parsed here, in-process, exactly as ``fit --print_config`` parses it (recipe, option
names and types), and every refusal is reported with the cells it concerns and where the suite
file set the option. Also here: the output folder's write check and the lock that keeps two
``suite run`` of one folder apart.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmark.app.builder import build_cli, user_error
from benchmark.app.suites.fields import SuiteError, _Problems
from benchmark.app.suites.spec import RUN_LOCK, Cell, Suite, fcntl
from benchmark.core.io import make_writable_dir


# ---------------------------------------------------------------------------- validation
def validate_cells(suite: Suite, cells: list[Cell] | None = None) -> None:
    """Parse every cell's configuration with the CLI's parser, as ``fit --print_config`` does
    (recipe, options, types), in this process. Cells that differ only in their seed share one check.

    Args:
        suite: the loaded suite.
        cells: the cells to check (``--only``, one ``run-cell``); default every cell.

    Raises:
        SuiteError: every refused configuration at once, each message naming up to three of
            its cells and the suite-file entries that set the options it names.
    """
    problems = _Problems(suite.path)
    checked: dict[tuple[str, ...], str | None] = {}
    # One message, every cell it concerns: a typo in the file's args would otherwise give one
    # identical line per cell.
    refused: dict[str, list[str]] = {}
    for cell in cells if cells is not None else suite.cells:
        argv = cell.argv
        # Cells that differ only in the seed or in what {placeholders} filled in (paths) parse alike.
        key = cell.template or tuple(argv[:-2])
        if key not in checked:
            checked[key] = _parse_error(argv)
        message = checked[key]
        if message:
            # Point back into the file: the options the parser's message names, with the entry
            # (args, grid.variants.x, cells[...]) that set each for this cell.
            # (as --option, or as jsonargparse's quoted "option" key of a refused value)
            origin = [f"--{o} ({src})" for o, src in cell.sources.items()
                      if re.search(rf'--{re.escape(o)}\b|"{re.escape(o)}"', message)]
            where = f" Set in the suite file: {', '.join(origin)}." if origin else ""
            refused.setdefault(f"{message}{where}", []).append(cell.id)
    for message, ids in refused.items():
        more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
        problems.add(f"{'cell' if len(ids) == 1 else 'cells'} {', '.join(ids[:3])}{more}: {message}")
    problems.raise_if_any()


def _parse_error(argv: list[str]) -> str | None:
    """The CLI's message for a configuration it refuses, or None.

    ``--print_config`` makes the parser stop after parsing (a SystemExit, 0 on success), so
    no model, datamodule or trainer is built. The printed configuration and the
    parser's own error output are captured; a refusal comes back as the parser's ``error:``
    lines, or as the message of the UserError a check raised while parsing.
    """
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    try:
        # Quiet: the configuration and any library warnings would otherwise print once per
        # distinct cell configuration in the middle of the suite's own output.
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            build_cli("fit", [*argv, "--print_config"], run=True)
    except SystemExit as exit_:  # how jsonargparse ends both --print_config and a parse error
        code = exit_.code
    except Exception as error:  # noqa: BLE001 - what the parser refuses is the user's to fix
        cause = user_error(error)
        return str(cause) if cause is not None else f"{type(error).__name__}: {error}"
    if code in (0, None):
        return None
    # jsonargparse prints the usage, then "error: ..." and the lines that explain it (a value
    # refused by each alternative of a Union, indented below); keep those, on one line (the usage
    # is long and the same for every cell), else the last line, else the exit code.
    text = err.getvalue()
    first = re.search(r"^error: ", text, re.M)
    if first:
        return " ".join(line.strip() for line in text[first.end():].splitlines() if line.strip())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else f"the configuration was refused (exit {code})."


def check_output(folder: Path, create: bool) -> None:
    """The output folder must be writable (created when ``create``).

    Args:
        folder: the suite's output folder.
        create: create it (``suite run``, ``run-cell``) and prove it writable by writing a
            file; otherwise (``--dry-run``) create nothing and check that the nearest existing
            folder on its path lets a user create it.

    Raises:
        SuiteError: the folder cannot be created or written, with the options that change it.
    """
    if create:
        try:
            make_writable_dir(folder)
        except OSError as err:
            raise SuiteError(f"Cannot write into the suite's output folder {folder}: {err}. "
                             "Pass --output DIR (or output: in the file) with a writable folder.") from None
        return
    # The first existing folder on the path is where a run would create the rest.
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SuiteError(f"Cannot write into the suite's output folder {folder} ({existing} is not a writable folder). "
                         "Pass --output DIR (or output: in the file) with a writable folder.")


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold ``<folder>/.suite-run.lock`` while a ``suite run`` uses the output folder.

    Without it, two runs of one suite plan the same pending cell and both start a fit into its
    folder: a fit says it is running only once its interpreter has started (seconds), so the
    second run cannot see the first one's cell yet. The lock is an OS file lock (``flock``),
    released when the process ends however it ends, so a killed run leaves nothing stale; the
    file names its holder for the message a second run gets.
    """
    if fcntl is None:  # no flock (Windows): run without the lock
        yield
        return
    path = folder / RUN_LOCK
    # "a+" creates the file without truncating it: a run that is refused still reads the
    # holder's line; the holder empties and rewrites it only once it has the lock.
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            # Non-blocking: a second run is refused at once instead of waiting for hours.
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SuiteError(
                f"Another `suite run` is using the output folder {folder} ({holder}). Wait for it to finish "
                f"(`python -m benchmark suite status FILE` shows its progress), stop it, or run into another "
                f"folder with --output DIR."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock
