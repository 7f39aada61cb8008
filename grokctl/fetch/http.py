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
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2

from grokctl.atomic import replace_into
from grokctl.config import default
from grokctl.errors import GrokctlError, IntegrityError, MissingResourceError
from grokctl.fetch.common import sha256_file
from grokctl.paths import shown
from grokctl.units import human_bytes

RETRIES: int = default("retries")  # per file (grokctl.config.SETTINGS)
HTTP_TIMEOUT_S = 60.0  # seconds without data over HTTP when `timeout` is not set

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


class _State:
    """Bytes in the part file and their running hashes (kept in step, even across failures)."""

    def __init__(self, t: Transfer):
        self.t = t
        self.fetched = 0
        self.reset()

    def reset(self) -> None:
        self.done = 0
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(f"blob {self.t.size}\0".encode()) if self.t.blob_id else None

    def update(self, data: Any) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)

    def hexdigest(self) -> str:  # (lets sha256_file feed the prefix of a resumed part file)
        return self.sha256.hexdigest()


def part_path(partial: Path, name: str, key: str | None) -> Path:
    """`<partial>/<name>.<first 16 of key>.part` (key: expected sha256, blob id or etag)."""
    tag = f".{key[:16]}" if key else ""
    return partial / f"{name}{tag}.part"


def transfer(
    t: Transfer,
    session: httpx2.Client,
    *,
    retries: int = RETRIES,
    timeout: float = HTTP_TIMEOUT_S,
    on_bytes: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    retry_wait: float = 1.0,
) -> TransferResult:
    """Fetch `t.url` into `t.dest` through its part file; see the module docstring."""
    t.part.parent.mkdir(parents=True, exist_ok=True)
    st = _State(t)
    if t.part.exists():
        if t.part.stat().st_size > t.size:
            t.part.unlink()
        else:
            sha256_file(t.part, on_bytes, hasher=st)  # type: ignore[arg-type]
            st.done = t.part.stat().st_size
    resumed_from = st.done
    failures = 0
    while st.done < t.size or not t.part.exists():
        before = st.done
        try:
            _get(t, session, st, timeout, on_bytes, cancel)
            if st.done < t.size:
                raise httpx2.RemoteProtocolError("response ended early")
        except (httpx2.TransportError, _RetryableStatus) as exc:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled") from None
            failures = 1 if st.done > before else failures + 1  # progress resets the count
            if (
                isinstance(exc, httpx2.ConnectError)
                and st.done == 0
                and (failures > retries or _unresolvable(exc))
            ):
                host = urlsplit(t.url).hostname or t.url
                raise MissingResourceError(
                    f"{t.name}: cannot reach {host} ({_reason(exc)})"
                ) from None
            if failures > retries:
                raise GrokctlError(
                    f"{t.name}: transfer interrupted after {human_bytes(st.done)} of "
                    f"{human_bytes(t.size)} ({type(exc).__name__}: {shown(str(exc), 300)}); "
                    "run the same command again to resume"
                ) from None
            _sleep(min(retry_wait * 2 ** (failures - 1), 30.0), cancel)
    if st.done != t.size:
        raise IntegrityError(f"{t.name}: received {st.done} bytes, expected {t.size}")
    digest = st.sha256.hexdigest()
    mismatch = None
    if t.sha256 and digest != t.sha256:
        mismatch = f"sha256 {digest} does not match the expected {t.sha256}"
    elif st.sha1 is not None and st.sha1.hexdigest() != t.blob_id:
        mismatch = f"git blob id {st.sha1.hexdigest()} does not match the hub's {t.blob_id}"
    if mismatch:
        t.part.unlink(missing_ok=True)
        raise IntegrityError(f"{t.name}: {mismatch}; the download was removed, run again")
    replace_into(t.part, t.dest)
    return TransferResult(t.name, st.done, digest, st.fetched, resumed_from)


class _RetryableStatus(Exception):
    pass


def _unresolvable(exc: BaseException) -> bool:
    """A host name that does not resolve: retrying will not help."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@contextmanager
def _abort_on_cancel(resp: httpx2.Response, cancel: threading.Event | None) -> Iterator[None]:
    """While the body is read, a watcher shuts the connection's socket down as soon as `cancel`
    is set, so a read blocked on a stalled server returns at once (Ctrl-C answers within a
    fraction of a second instead of after the read timeout)."""
    stream = resp.extensions.get("network_stream") if cancel is not None else None
    sock = stream.get_extra_info("socket") if stream is not None else None
    if cancel is None or not isinstance(sock, socket.socket):
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if cancel.wait(_CANCEL_POLL_S):
                if not done.is_set():
                    try:  # the plain socket's shutdown, also under TLS: the reader wakes up
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass
                return

    watcher = threading.Thread(target=watch, name="grokctl-cancel-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


_CANCEL_POLL_S = 0.2


def _sleep(seconds: float, cancel: threading.Event | None) -> None:
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise Cancelled("cancelled")


def _get(
    t: Transfer,
    session: httpx2.Client,
    st: _State,
    timeout: float,
    on_bytes: Callable[[int], None] | None,
    cancel: threading.Event | None,
) -> None:
    """One GET from `st.done` on, appending to the part file as bytes arrive."""
    headers = {**t.headers, "Accept-Encoding": "identity"}
    if st.done:
        headers["Range"] = f"bytes={st.done}-"
    with session.stream("GET", t.url, headers=headers, timeout=timeout) as resp:
        status = resp.status_code
        if status in _RETRY_STATUS:
            raise _RetryableStatus(f"HTTP {status} from {resp.url}")
        if status == 416 and st.done:  # the part file is longer than the remote file
            t.part.unlink(missing_ok=True)
            st.reset()
            raise _RetryableStatus("HTTP 416: restarting from byte 0")
        _raise_for_status(resp, t)
        if st.done and status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != st.done:
                raise IntegrityError(
                    f"{t.name}: asked for bytes {st.done}- and got "
                    f"{shown(resp.headers.get('Content-Range'))}"
                )
            mode = "ab"
        else:  # 200: the whole file (a server that ignores Range restarts us from 0)
            st.reset()
            mode = "wb"
        try:
            with _abort_on_cancel(resp, cancel), open(t.part, mode) as fh:
                for chunk in resp.iter_bytes():
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("cancelled")
                    fh.write(chunk)
                    fh.flush()  # the part file on disk is what a rerun resumes from: keep it current
                    st.update(chunk)
                    st.done += len(chunk)
                    st.fetched += len(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise MissingResourceError(f"{t.part}: no space left on device") from None
            raise


def _raise_for_status(resp: httpx2.Response, t: Transfer) -> None:
    status = resp.status_code
    if status < 400:
        return
    resp.read()
    where = f"{t.name} ({shown(str(resp.url), 300)})"
    if status in (401, 403):
        raise GrokctlError(
            f"{where}: access denied (HTTP {status}); set HF_TOKEN to a token that can read it"
        )
    if status == 404:
        raise MissingResourceError(f"{where}: not found (HTTP 404)")
    raise GrokctlError(f"{where}: HTTP {status}")
