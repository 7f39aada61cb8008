"""The command line. `entry` is the `grokctl` script: light to import, so that Ctrl-C while the
heavy modules load still ends with one line and exit 130, never a traceback."""

from __future__ import annotations

import os
import sys

EXIT_INTERRUPTED = 130


def entry() -> None:
    try:
        from grokctl.cli.app import main
    except KeyboardInterrupt:
        sys.stderr.write("grokctl: error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    finish(main())


def finish(code: int) -> None:
    """Exit with `code`. After Ctrl-C (130) the command has already saved what it keeps (part
    files, manifest, results) and said so: the process ends now, without waiting at interpreter
    exit for worker threads that may still sit in a blocking call (a transfer waiting on a
    silent server would otherwise hold the exit until its read timeout)."""
    if code == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)
