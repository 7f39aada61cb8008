"""The command line. `entry` is the `grokctl` script: light to import, so that Ctrl-C while the
heavy modules load still ends with one line and exit 130, never a traceback."""

from __future__ import annotations

import sys


def entry() -> None:
    try:
        from grokctl.cli.app import main
    except KeyboardInterrupt:
        sys.stderr.write("grokctl: error: interrupted\n")
        sys.exit(130)
    sys.exit(main())
