"""Names that come from files and servers (hub listings, torrents, manifests, pickles): shown
safely in messages, and validated before one is used as a path under a directory.

`shown(name)` is the one way an untrusted name enters a message: control characters and ANSI
escapes are written out (`\\x1b`, `\\x0a`), never interpreted (and escaping twice changes
nothing), and the name is cut to a sane length.
`check_relative_path(name, root)` is the one gate before such a name becomes a file: it refuses
absolute paths, `..`, `.` and empty components, backslashes and drive letters, control and
invisible formatting characters, over-long names, and any path that resolves (through symlinks
already in `root`) outside `root`.
"""

from __future__ import annotations

import os
import re
import unicodedata

from grokctl.errors import IntegrityError

SHOWN_MAX = 120  # characters of an untrusted name kept in a message
_NAME_MAX = 255  # bytes per component (every common filesystem)
_PATH_MAX = 1024  # characters of a whole relative path
_DRIVE = re.compile(r"^[A-Za-z]:")
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # controls, bidi/zero-width marks, surrogates


def _unsafe_char(c: str) -> bool:
    return unicodedata.category(c) in _UNSAFE_CATEGORIES


def shown(name: object, limit: int = SHOWN_MAX) -> str:
    """`name` fit for a one-line message: unsafe characters escaped, cut to `limit` characters."""
    text = name if isinstance(name, str) else repr(name)
    if len(text) > 4 * limit:
        text = text[: 4 * limit]  # escaping can only grow it: no need to look further
        cut = True
    else:
        cut = False
    out = []
    for c in text:
        if _unsafe_char(c):
            code = ord(c)
            width = 2 if code < 0x100 else 4 if code < 0x10000 else 8
            out.append(f"\\{'xuU'[width // 3]}{code:0{width}x}")
        else:
            out.append(c)
    escaped = "".join(out)
    if cut or len(escaped) > limit:
        escaped = escaped[:limit] + "…"
    return escaped


def path_problem(name: object) -> str | None:
    """Why `name` cannot be a relative path under a directory (None when it can), judged on the
    text alone."""
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name:
        return "empty path"
    if len(name) > _PATH_MAX:
        return f"path longer than {_PATH_MAX} characters"
    if any(_unsafe_char(c) for c in name):
        return "control or invisible characters"
    if "\\" in name:
        return "backslash"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE.match(name):
        return "drive letter"
    for part in name.split("/"):
        if not part:
            return "empty component"
        if part in (".", ".."):
            return f"{part!r} component"
        if len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX:
            return f"component longer than {_NAME_MAX} bytes"
    return None


def check_relative_path(name: object, root: str | os.PathLike[str], what: str = "entry") -> str:
    """Return `name` when it is a safe relative path under `root`; else raise IntegrityError
    (exit 3) naming it. Nothing is created: symlinks already in `root` are followed to see where
    the path would really land."""
    problem = path_problem(name)
    if problem is None:
        assert isinstance(name, str)
        base = os.path.realpath(root)
        target = os.path.realpath(os.path.join(base, name))
        if os.path.commonpath([base, target]) != base:
            problem = "resolves outside the directory (through a symlink)"
    if problem is not None:
        raise IntegrityError(f'{root}: refused {what} "{shown(name)}": {problem}')
    return name  # type: ignore[return-value]


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Does `path`, with its symlinks resolved, lie under `root` (resolved)?"""
    base = os.path.realpath(root)
    return os.path.commonpath([base, os.path.realpath(path)]) == base
