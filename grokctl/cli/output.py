"""Output conventions shared by every command.

stdout carries only the result (a table, text, or JSON with --json); logs, warnings and progress
go to stderr; progress bars only when stderr is a terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from grokctl.units import human_bytes

__all__ = ["emit_json", "err", "human_bytes", "info", "out", "progress"]

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def info(msg: str) -> None:
    err.print(msg)


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (one line, so `jq` and line readers both work)."""
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class _NoProgress:
    """Stands in for rich.Progress when stderr is not a terminal."""

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def advance(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextmanager
def progress(kind: str = "items", enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr: kind "bytes" shows size/rate/ETA, "items" shows M/N."""
    if not enabled or not err.is_terminal:
        yield _NoProgress()
        return
    if kind == "bytes":
        columns: tuple[Any, ...] = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
    else:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
    with Progress(*columns, console=err, transient=True) as bar:
        yield bar


def warn(msg: str) -> None:
    """One `grokctl: warning:` line on stderr (plain text, never markup)."""
    err.print(f"grokctl: warning: {msg}", markup=False, highlight=False)


def end_line() -> None:
    """After Ctrl-C: leave the terminal on a clean line (a streamed text gets its newline, a
    progress bar or status line on stderr is cleared)."""
    try:
        if getattr(sys.stdout, "isatty", lambda: False)() and _mid_line.get("stdout"):
            sys.stdout.write("\n")
            sys.stdout.flush()
        if err.is_terminal:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
    except (OSError, ValueError):
        pass


_mid_line: dict[str, bool] = {}


def mark_mid_line(stream: str, mid: bool) -> None:
    """Record whether `stream` ends in the middle of a line (streamed text)."""
    _mid_line[stream] = mid


def emit_table(table: Any) -> None:
    """A rich table on stdout; piped to a file or a pager it keeps its natural width (never
    folded or cut)."""
    from rich.measure import Measurement

    if out.is_terminal:
        out.print(table)
        return
    wide = out.options.update(max_width=1000)
    width = max(out.width, Measurement.get(out, wide, table).maximum)
    Console(file=sys.stdout, width=width, highlight=False, soft_wrap=True).print(table)
