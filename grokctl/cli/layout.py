"""Plain-text layout for human output: columns when they fit the terminal, wrapped records when
they do not. Nothing is ever cut: a value wider than the line keeps its own line, whole.

Rich tables are avoided for long listings: they fold or ellipsize cells on a narrow terminal and
take about a second for the 770 rows of Grok-1; these helpers are plain string formatting.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

GAP = "  "


def line_width() -> int | None:
    """The width to lay out for: $COLUMNS when set, else the terminal's; None (unbounded, one
    record per line) when stdout is not a terminal, so that files and pipes stay greppable."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def columns(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[bool],
    width: int | None,
) -> list[str] | None:
    """The rows as aligned columns, or None when they do not fit in `width`."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if width is not None and sum(widths) + len(GAP) * (len(widths) - 1) > width:
        return None

    def fmt(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return GAP.join(parts).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def records(
    header: Sequence[str], rows: Sequence[Sequence[str]], width: int, key: int = 0, indent: int = 4
) -> list[str]:
    """Each row as a record: its `key` cell on a line, then `name value` fields filled into
    lines of at most `width` (a field longer than the line gets a line of its own, whole)."""
    lines: list[str] = []
    pad = " " * indent
    for row in rows:
        lines.append(row[key])
        fields = [f"{h} {c}" for i, (h, c) in enumerate(zip(header, row)) if i != key and c]
        lines.extend(fill(fields, width, pad))
    return lines


def fill(fields: Sequence[str], width: int, pad: str = "", sep: str = GAP) -> list[str]:
    """`fields` joined by `sep` into lines of at most `width`, breaking only between fields."""
    lines: list[str] = []
    current = ""
    for field in fields:
        candidate = f"{current}{sep}{field}" if current else pad + field
        if current and len(candidate) > width:
            lines.append(current)
            candidate = pad + field
        current = candidate
    if current:
        lines.append(current)
    return lines


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[bool],
    width: int | None,
    key: int = 0,
) -> list[str]:
    """Aligned columns when they fit in `width` (always when unbounded), else records."""
    laid = columns(header, rows, right, width)
    if laid is not None:
        return laid
    assert width is not None
    return records(header, rows, width, key)


def wrap(text: str, width: int | None, indent: str = "") -> list[str]:
    """`text` wrapped at spaces to `width`, continuation lines indented by `indent` (its own
    leading spaces kept); words stay whole."""
    if width is None:
        return [text]
    body = text.lstrip(" ")
    lead = text[: len(text) - len(body)]
    lines: list[str] = []
    current = lead
    for word in body.split(" "):
        if current.strip() and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = indent + word
        else:
            current = f"{current} {word}" if current.strip() else current + word
    return [*lines, current]
