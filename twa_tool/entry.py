"""The ``twa`` console script and ``python -m twa_tool``: an entry that imports nothing but the standard
library before the CLI, so a Ctrl-C while click, rich and the CLI are still loading (the first ~0.1 s) is one
line and exit 130, like one at any later point, not a ``KeyboardInterrupt`` traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was written\n")
        sys.exit(130)
    cli_main()
