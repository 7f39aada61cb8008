"""Pieces shared by the Hugging Face and BitTorrent downloads: file selection by pattern, the
partial area, free-space checks and file hashing."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from grokctl.errors import GrokctlError, MissingResourceError
from grokctl.units import human_bytes

DEFAULT_INCLUDE = ("ckpt-0/*",)
PARTIAL_DIR = ".grokctl-partial"
CHUNK = 8 << 20

_GLOB_CHARS = set("*?[")


class Interrupted(GrokctlError):
    """Ctrl-C (exit 130), reported in one line; partial files and resume data are kept."""

    exit_code = 130


def split_patterns(patterns: Iterable[str] | None) -> list[str]:
    """Accept repeated flags and comma-separated lists; `./x` and `x/` are normalised."""
    out = []
    for raw in patterns or ():
        for pat in raw.split(","):
            pat = pat.strip().removeprefix("./")
            if pat:
                out.append(pat)
    return out


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex where `*`, `?` and `[...]` never cross `/` and `**` does."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            neg = body.startswith("!")
            body = re.escape(body[1:] if neg else body).replace("\\-", "-")
            out.append(f"(?!/)[^{body}]" if neg else f"(?!/)[{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def matches(path: str, pattern: str) -> bool:
    """A glob whose `*` stops at `/` (`**` crosses it): `ckpt-0/*` is the files of `ckpt-0/`,
    never `ckpt-0/../x`. A pattern without `/` matches the last component at any depth (`*.json`,
    `*9_000`), and a bare directory name selects everything under it, so `--include ckpt-0` works
    without the quoting `ckpt-0/*` needs in zsh."""
    if _glob_regex(pattern).match(path):
        return True
    if "/" not in pattern and _glob_regex(pattern).match(path.rsplit("/", 1)[-1]):
        return True
    if not (_GLOB_CHARS & set(pattern)):
        stem = pattern.rstrip("/")
        return path == stem or path.startswith(stem + "/")
    return False


def select(paths: Iterable[str], include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """Paths matching any include pattern (all when none) and no exclude pattern."""
    return [
        p
        for p in paths
        if (not include or any(matches(p, pat) for pat in include))
        and not any(matches(p, pat) for pat in exclude)
    ]


def partial_dir(root: Path) -> Path:
    return root / PARTIAL_DIR


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds (or will hold) `path`."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk_space(root: Path, needed: int) -> int:
    """Raise MissingResourceError (exit 4) when `needed` bytes will not fit; return free bytes."""
    free = free_bytes(root)
    if needed > free:
        raise MissingResourceError(
            f"not enough disk space in {root}: the download needs {human_bytes(needed)}, "
            f"{human_bytes(free)} free"
        )
    return free


def sha256_file(
    path: str | os.PathLike[str],
    on_bytes: Callable[[int], None] | None = None,
    hasher: hashlib._Hash | None = None,
) -> str:
    """sha256 of a file in 8 MiB reads (hashlib drops the GIL, so threads hash in parallel)."""
    h = hasher or hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
            if on_bytes:
                on_bytes(n)
    return h.hexdigest()


def git_blob_sha1(path: str | os.PathLike[str]) -> str:
    """Git's object id of a file (what the hub reports for files not stored in LFS)."""
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    return sha256_file(path, hasher=h)


def prune_partial(root: Path) -> None:
    """Remove the empty directories of the partial area (and the area itself when empty)."""
    base = partial_dir(root)
    if not base.is_dir():
        return
    for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        base.rmdir()
