"""``python -m benchmark`` (and the ``dml-benchmark`` script): checks the environment, then runs the CLI.

The check runs before the command line module is imported, because that import already imports
matplotlib (through torchmetrics), which raises on an invalid ``MPLBACKEND`` with a traceback.
"""

from __future__ import annotations

import os
import sys


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


def main() -> int:
    error = check_mplbackend()
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from benchmark.cli import main as cli_main  # heavy: torch, lightning, timm

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
