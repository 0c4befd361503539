"""``python -m benchmark`` (and the ``dml-benchmark`` script): checks the environment, then dispatches.

Commands that read (``--help``, ``list``, ``status``, ``leaderboard``, ``suite status|paper-table|list``)
run from light modules and never import torch, timm or Lightning (about 6 s of imports on a 2-core CPU);
``fit``/``test``/``suite run``/``perf`` and the rest go to :mod:`benchmark.app.cli`. The environment check runs first, because the CLI's import
already imports matplotlib (through torchmetrics), which raises on an invalid ``MPLBACKEND`` with a
traceback.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from benchmark.core.errors import EXIT_USER, UserError  # a leaf module: nothing heavy


def check_mplbackend() -> str | None:
    """The error for an ``MPLBACKEND`` that is not a matplotlib backend, or None.

    The figures draw on their own Agg canvases and never use the backend, but matplotlib validates
    the variable when it is imported, so any command would fail with a traceback.
    """
    value = os.environ.get("MPLBACKEND")
    if not value:
        return None
    os.environ.pop("MPLBACKEND")  # lets matplotlib import, to ask it
    try:
        from matplotlib.rcsetup import validate_backend

        validate_backend(value)
    except ValueError:
        return (f"The environment variable MPLBACKEND={value!r} is not a matplotlib backend, and matplotlib refuses "
                "to import with it. Unset it (`unset MPLBACKEND`) or set a valid one, e.g. MPLBACKEND=Agg; the "
                "benchmark draws its figures without a display either way.")  # fmt: skip
    finally:
        os.environ["MPLBACKEND"] = value
    return None


def _light(argv: list[str]) -> Callable[[list[str]], int] | None:
    """The entry point of a command that needs no deep-learning stack, or None (``argv`` without the command)."""
    command = argv[0] if argv else "--help"
    if command in ("-h", "--help"):
        from benchmark.core.defaults import DEFAULT_DATA, DEFAULT_METHOD, USAGE

        return lambda argv: print(USAGE.format(method=DEFAULT_METHOD, data=DEFAULT_DATA)) or 0
    if command == "status":
        from benchmark.app.status import main as status_main

        return status_main
    if command == "leaderboard":
        from benchmark.app.leaderboard import main as leaderboard_main

        return leaderboard_main
    if command == "list":
        from benchmark.app.listing import main as list_main

        return list_main
    if command == "suite" and len(argv) > 1 and argv[1] in ("status", "paper-table", "list"):
        from benchmark.app.suites.reading import main as suite_reading_main

        return suite_reading_main
    return None


def main(argv: list[str] | None = None) -> int:
    # When this process started, for the fit's start-up report (engine.training.ENV_STARTED; a string
    # here, as this module imports nothing heavy). Always overwritten: a suite's fit is a new process.
    os.environ["DML_BENCHMARK_STARTED"] = repr(time.time())
    argv = list(sys.argv[1:] if argv is None else argv)
    error = check_mplbackend()
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER
    light = _light(argv)
    if light is not None:
        try:
            return int(light(argv[1:]) or 0)
        except UserError as err:  # the same one paragraph and exit code as the full CLI
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER
    from benchmark.app.cli import main as cli_main  # heavy: torch, lightning, timm

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
