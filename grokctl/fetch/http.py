"""One file over HTTP(S), resumable across runs: Range requests into `<partial>/<name>.<key>.part`,
sha256 (and git blob id) computed on the fly, rename to the final name only when size and
checksum match.

huggingface_hub resumes only within one process; this resumes from whatever bytes an earlier,
interrupted run left in the part file (their hash is recomputed first, so the result is checked
end to end). The part file's name carries the expected checksum, so bytes of another revision are
never resumed into this one.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2

from grokctl.cli.output import human_bytes
from grokctl.errors import GrokctlError, IntegrityError, MissingResourceError
from grokctl.fetch.common import CHUNK, replace_into, sha256_file

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class Cancelled(GrokctlError):
    """The run is stopping (Ctrl-C, or another file failed): keep the part file for resume."""


@dataclasses.dataclass(frozen=True)
class Transfer:
    name: str  # repo-relative path, for messages
    url: str
    dest: Path
    part: Path
    size: int
    sha256: str | None = None
    blob_id: str | None = None  # git object id (sha1) of a non-LFS hub file
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TransferResult:
    name: str
    size: int
    sha256: str
    fetched: int  # bytes that came over the network in this run
    resumed_from: int  # bytes an earlier run had left in the part file


class _Hashers:
    def __init__(self, t: Transfer):
        self.t = t
        self.reset()

    def reset(self) -> None:
        self.sha256 = hashlib.sha256()
        self.sha1 = (
hashlib.sha1(f"blob {self.t.size}\0".encode()) if self.t.blob_id else None
        )

    def update(self, data: Any) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)


def part_path(partial: Path, name: str, key: str | None) -> Path:
    """`<partial>/<name>.<first 16 of key>.part` (key: expected sha256, blob id or etag)."""
    tag = f".{key[:16]}" if key else ""
    return partial / f"{name}{tag}.part"


def transfer(
    t: Transfer,
    session: httpx2.Client,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    on_bytes: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    retry_wait: float = 1.0,
) -> TransferResult:
    """Fetch `t.url` into `t.dest` through its part file; see the module docstring."""
    t.part.parent.mkdir(parents=True, exist_ok=True)
    hashers = _Hashers(t)
    done = 0
    if t.part.exists():
        done = t.part.stat().st_size
        if done > t.size:
            t.part.unlink()
            done = 0
        elif done:
            sha256_file(t.part, on_bytes, hasher=_Tee(hashers))
    resumed_from = done
    fetched = 0
    failures = 0
    while done < t.size or not t.part.exists():
        try:
            got, done = _get(t, session, done, hashers, timeout, on_bytes, cancel)
            fetched += got
            failures = 0 if got else failures
            if done < t.size and not got:
                raise httpx2.RemoteProtocolError("server sent no data")
        except (httpx2.TransportError, _RetryableStatus) as exc:
            failures += 1
            if failures > retries:
                raise GrokctlError(
                    f"{t.name}: transfer interrupted after {human_bytes(done)} of "
                    f"{human_bytes(t.size)} ({type(exc).__name__}: {exc}); "
                    "run the same command again to resume"
                ) from None
            _sleep(min(retry_wait * 2 ** (failures - 1), 30.0), cancel)
    if done != t.size:
        raise IntegrityError(f"{t.name}: received {done} bytes, expected {t.size}")
    digest = hashers.sha256.hexdigest()
    mismatch = None
    if t.sha256 and digest != t.sha256:
        mismatch = f"sha256 {digest} does not match the expected {t.sha256}"
    elif hashers.sha1 is not None and hashers.sha1.hexdigest() != t.blob_id:
        mismatch = f"git blob id {hashers.sha1.hexdigest()} does not match the hub's {t.blob_id}"
    if mismatch:
        t.part.unlink(missing_ok=True)
        raise IntegrityError(f"{t.name}: {mismatch}; the download was removed, run again")
    replace_into(t.part, t.dest)
    return TransferResult(t.name, done, digest, fetched, resumed_from)


class _RetryableStatus(Exception):
    pass


class _Tee:
    """Adapts _Hashers to the `hasher` argument of sha256_file."""

    def __init__(self, h: _Hashers):
        self.h = h

    def update(self, data: Any) -> None:
        self.h.update(data)

    def hexdigest(self) -> str:
        return ""


def _sleep(seconds: float, cancel: threading.Event | None) -> None:
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise Cancelled("cancelled")


def _get(
    t: Transfer,
    session: httpx2.Client,
    start: int,
    hashers: _Hashers,
    timeout: float,
    on_bytes: Callable[[int], None] | None,
    cancel: threading.Event | None,
) -> tuple[int, int]:
    """One GET from `start`; returns (bytes received, new end of the part file)."""
    headers = {**t.headers, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    with session.stream("GET", t.url, headers=headers, timeout=timeout) as resp:
        status = resp.status_code
        if status in _RETRY_STATUS:
            raise _RetryableStatus(f"HTTP {status} from {resp.url}")
        if status == 416 and start:
            t.part.unlink(missing_ok=True)  # the part file is longer than the remote file
            hashers.reset()
            return 0, 0
        _raise_for_status(resp, t)
        if start and status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                raise IntegrityError(f"{t.name}: server answered range {start}- with {m and m.group(0)}")
            mode = "ab"
        else:  # 200: the whole file (a server that ignores Range restarts from 0)
            hashers.reset()
            start, mode = 0, "wb"
        got = 0
        try:
            with open(t.part, mode) as fh:
                for chunk in resp.iter_bytes(CHUNK // 8):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("cancelled")
                    fh.write(chunk)
                    hashers.update(chunk)
                    got += len(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise MissingResourceError(f"{t.part}: no space left on device") from None
            raise
    return got, start + got


def _raise_for_status(resp: httpx2.Response, t: Transfer) -> None:
    status = resp.status_code
    if status < 400:
        return
    resp.read()
    where = f"{t.name} ({resp.url})"
    if status in (401, 403):
        raise GrokctlError(
            f"{where}: access denied (HTTP {status}); set HF_TOKEN to a token that can read it"
        )
    if status == 404:
        raise MissingResourceError(f"{where}: not found (HTTP 404)")
    raise GrokctlError(f"{where}: HTTP {status}")
