"""``python -m benchmark`` entry point."""

import sys

from benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
