"""A torrent's files as paths under the download directory, and a re-check of the files on
disk against the torrent's v1 piece hashes (sha1 per piece)."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grokctl.checkpoint.xai.files import CKPT_SUBDIR
from grokctl.errors import UsageError
from grokctl.paths import check_relative_path


def relative_path(torrent_path: str) -> str:
    """A torrent's file path as a path under the download directory: from `ckpt-0/` on when
    present, else without the torrent's top directory."""
    parts = torrent_path.replace("\\", "/").split("/")
    if CKPT_SUBDIR in parts:
        return "/".join(parts[parts.index(CKPT_SUBDIR) :])
    return "/".join(parts[1:]) if len(parts) > 1 else parts[0]


def torrent_files(ti: Any) -> list[tuple[int, str, int]]:
    """(index, relative path, size) of the real files of a torrent (pad files left out)."""
    fs = ti.layout()
    import libtorrent as lt

    return [
        (i, relative_path(fs.file_path(i)), fs.file_size(i))
        for i in range(fs.num_files())
        if not fs.file_flags(i) & lt.file_storage.flag_pad_file
    ]


@dataclasses.dataclass
class PieceReport:
    pieces: int  # pieces in the torrent
    checked: int
    skipped: int  # pieces touching a file that is absent or has the wrong size
    failed: int
    bad_files: dict[str, int]  # relative path -> failed pieces touching it
    bytes: int


def check_pieces(
    root: Path,
    torrent: Path,
    workers: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> PieceReport:
    """Hash every piece whose files are all present with their torrent sizes."""
    import libtorrent as lt

    try:
        ti = lt.torrent_info(torrent.read_bytes())
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"{torrent}: not a readable .torrent file ({exc})") from None
    if not ti.info_hashes().has_v1():
        raise UsageError(f"{torrent}: v2-only torrents are not supported")
    fs = ti.layout()
    pad = {i for i in range(fs.num_files()) if fs.file_flags(i) & lt.file_storage.flag_pad_file}
    rel = {i: relative_path(fs.file_path(i)) for i in range(fs.num_files()) if i not in pad}
    for p in rel.values():  # never read outside the checkpoint
        check_relative_path(p, root, f"file of {torrent.name}")
    usable = {
        i
        for i, p in rel.items()
        if (root / p).is_file() and (root / p).stat().st_size == fs.file_size(i)
    }

    def one(piece: int) -> tuple[int, bool | None, list[int]]:
        slices = ti.map_block(piece, 0, ti.piece_size(piece))
        files = [s.file_index for s in slices if s.file_index not in pad]
        if any(i not in usable for i in files):
            return piece, None, files
        h = hashlib.sha1()
        for s in slices:
            if s.file_index in pad:
                h.update(bytes(s.size))
                continue
            fd = os.open(root / rel[s.file_index], os.O_RDONLY)
            try:
                h.update(os.pread(fd, s.size, s.offset))
            finally:
                os.close(fd)
        if on_bytes:
            on_bytes(ti.piece_size(piece))
        return piece, h.digest() == ti.hash_for_piece(piece), files

    report = PieceReport(ti.num_pieces(), 0, 0, 0, {}, 0)
    with cf.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for piece, ok, files in pool.map(one, range(ti.num_pieces())):
            if ok is None:
                report.skipped += 1
                continue
            report.checked += 1
            report.bytes += ti.piece_size(piece)
            if not ok:
                report.failed += 1
                for i in files:
                    report.bad_files[rel[i]] = report.bad_files.get(rel[i], 0) + 1
    return report
