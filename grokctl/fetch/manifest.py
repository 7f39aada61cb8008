"""`grokctl-manifest.json`: what a download put in a directory, and how to check it.

```
{"format": "grokctl-manifest/1", "created": ..., "updated": ...,
 "sources": {"hf:xai-org/grok-1@<commit>": {"kind": "huggingface", "repo": ..., "revision": ...,
             "commit": ..., "endpoint": ..., "date": ...},
             "magnet:<info-hash>": {"kind": "magnet", "info_hash": ..., "torrent": ..., "date": ...}},
 "files": {"ckpt-0/tensor00000_000": {"size": 3221225637, "sha256": "...",
           "sha256_from": "hub-lfs" | "local" | "pinned", "source": "hf:...",
           "downloaded": "2024-03-18T12:00:00Z" | null}}}
```
A download writes the records of every file it is going to fetch first (size, and sha256 where
the source knows it), so `verify` reports what an interrupted run has not fetched yet; a file's
`downloaded` date is set once it sits complete under its final name. Every write is atomic.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

from grokctl.atomic import atomic_write_json
from grokctl.errors import IntegrityError
from grokctl.paths import check_relative_path, shown

MANIFEST_NAME = "grokctl-manifest.json"
FORMAT = "grokctl-manifest/1"


def now_iso() -> str:
    return (
        dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    )


@dataclasses.dataclass
class FileRecord:
    size: int
    sha256: str | None = None
    sha256_from: str | None = None  # "hub-lfs" | "local" | "pinned"
    source: str | None = None  # a key of Manifest.sources
    downloaded: str | None = None  # ISO date, once complete under its final name
    blob_id: str | None = None  # the hub's git object id of a non-LFS file

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "sha256"}


@dataclasses.dataclass
class Manifest:
    root: Path
    files: dict[str, FileRecord] = dataclasses.field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    created: str = dataclasses.field(default_factory=now_iso)
    updated: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._last_save = 0.0

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    @classmethod
    def load(cls, root: str | Path) -> Manifest | None:
        """The manifest in `root`, or None when there is none. Every entry is checked (a safe
        relative path under `root`, a non-negative integer size, hex checksums): a manifest
        that fails is refused whole (IntegrityError, exit 3), never partly used."""
        root = Path(root)
        path = root / MANIFEST_NAME
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IntegrityError(f"{path}: cannot read the manifest ({exc.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{path}: the manifest is not a regular file")
        if st.st_size > _MAX_BYTES:
            raise IntegrityError(f"{path}: {st.st_size} bytes, too large for a manifest")
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            raise IntegrityError(
                f"{path}: not a readable grokctl manifest ({shown(str(exc))})"
            ) from None
        problem = _problem(data)
        if problem:
            raise IntegrityError(f"{path}: not a valid grokctl manifest: {problem}")
        for name in data["files"]:
            check_relative_path(name, root, f"{MANIFEST_NAME} entry")
        files = {
            name: FileRecord(**{k: v for k, v in rec.items() if k in _RECORD_FIELDS})
            for name, rec in data["files"].items()
        }
        sources = data.get("sources", {})
        return cls(root, files, sources, str(data.get("created") or now_iso()), data.get("updated"))

    @classmethod
    def load_or_new(cls, root: str | Path) -> Manifest:
        return cls.load(root) or cls(Path(root))

    def add_source(self, key: str, **info: Any) -> str:
        with self._lock:
            self.sources[key] = {**info, "date": now_iso()}
        return key

    def record(self, name: str, rec: FileRecord) -> None:
        check_relative_path(name, self.root, f"{MANIFEST_NAME} entry")
        with self._lock:
            self.files[name] = rec

    def mark_downloaded(
        self, name: str, sha256: str | None = None, sha256_from: str | None = None
    ) -> None:
        with self._lock:
            rec = self.files[name]
            if sha256 is not None and rec.sha256 is None:
                rec.sha256, rec.sha256_from = sha256, sha256_from
            rec.downloaded = now_iso()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "created": self.created,
            "updated": self.updated,
            "sources": self.sources,
            "files": {name: self.files[name].to_json() for name in sorted(self.files)},
        }

    def save(self, min_interval: float = 0.0) -> None:
        """Write atomically (temporary name, then rename); skip when saved < min_interval ago."""
        with self._lock:
            now = time.monotonic()
            if min_interval and now - self._last_save < min_interval:
                return
            self._last_save = now
            self.updated = now_iso()
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.to_json())


_RECORD_FIELDS = {f.name for f in dataclasses.fields(FileRecord)}
_MAX_BYTES = 64 << 20
_HEX = re.compile(r"[0-9a-f]+")


def _problem(data: Any) -> str | None:
    """What is wrong with a parsed manifest, in words (None when it is well formed)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    if data.get("format") != FORMAT:
        return f"format {shown(data.get('format'))}, expected {FORMAT!r}"
    files, sources = data.get("files"), data.get("sources", {})
    if not isinstance(files, dict):
        return "`files` is not an object"
    if not isinstance(sources, dict) or not all(isinstance(v, dict) for v in sources.values()):
        return "`sources` is not an object of objects"
    for name, rec in files.items():
        where = f"entry {shown(name)}"
        if not isinstance(rec, dict):
            return f"{where} is not an object"
        size = rec.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"{where}: size {shown(size)} is not a non-negative integer"
        for key, width in (("sha256", (64,)), ("blob_id", (40, 64))):
            value = rec.get(key)
            if value is not None and not (
                isinstance(value, str) and len(value) in width and _HEX.fullmatch(value)
            ):
                return f"{where}: {key} {shown(value)} is not a lowercase hex digest"
        for key in ("sha256_from", "source", "downloaded"):
            if not isinstance(rec.get(key), str | None):
                return f"{where}: {key} {shown(rec.get(key))} is not a string"
    return None
