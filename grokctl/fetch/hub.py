"""Download from the Hugging Face hub: huggingface_hub lists the repo (endpoint, token, offline
mode, errors), our own resumable transfer moves the bytes (see `fetch.http`).

`plan_hub` resolves the revision to a commit, lists the files with their sizes and LFS sha256,
applies the include/exclude patterns and works out what is already on disk; `download_hub`
fetches the rest in parallel and keeps `grokctl-manifest.json` up to date.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2

from grokctl.config import default
from grokctl.errors import GrokctlError, IntegrityError, MissingResourceError, UsageError
from grokctl.fetch.common import git_blob_sha1, partial_dir, prune_partial, select, sha256_file
from grokctl.fetch.http import HTTP_TIMEOUT_S, RETRIES, Cancelled, Transfer, part_path, transfer
from grokctl.fetch.manifest import FileRecord, Manifest
from grokctl.paths import check_relative_path, shown

DEFAULT_REPO: str = default("repo")  # stated once, in grokctl.config.SETTINGS
DEFAULT_REVISION: str = default("revision")


CANCEL_GRACE_S = 2.0  # after Ctrl-C: how long transfers get to stop before we go on


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_headers() -> dict[str, str]:
    """User agent and `Authorization` from HF_TOKEN (or the stored login), as huggingface_hub sends."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers()


@dataclasses.dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # LFS files only
    blob_id: str | None
    url: str


@dataclasses.dataclass
class HubPlan:
    repo: str
    revision: str
    commit: str
    endpoint: str
    files: list[HubFile]
    present: set[str]  # complete under the final name, recorded in the manifest
    unverified: set[str]  # final name exists with the right size but no record: hash it first
    partial_bytes: dict[str, int]  # bytes an interrupted run left in part files
    tokenizer: HubFile | None = None  # the repo's tokenizer.model, when it has one
    offline: bool = False

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def bytes_present(self) -> int:
        return sum(f.size for f in self.files if f.path in self.present | self.unverified)

    @property
    def bytes_needed(self) -> int:
        """Bytes still to come over the network (in the worst case for unverified files: 0)."""
        return self.bytes_total - self.bytes_present - sum(self.partial_bytes.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": self.endpoint,
            "files": len(self.files),
            "listing": [
                {
                    "path": f.path,
                    "size": f.size,
                    "sha256": f.sha256,
                    "present": f.path in self.present | self.unverified,
                }
                for f in self.files
            ],
            "bytes": self.bytes_total,
            "bytes_present": self.bytes_present,
            "bytes_needed": self.bytes_needed,
        }


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str, endpoint: str) -> Iterator[None]:
    """huggingface_hub exceptions -> one-line grokctl errors with the right exit code."""
    from huggingface_hub import errors as hf

    try:
        yield
    except hf.GatedRepoError:
        raise GrokctlError(
            f"{repo}: gated repository; accept its terms on the hub and set HF_TOKEN"
        ) from None
    except hf.RepositoryNotFoundError:
        raise MissingResourceError(
            f"{repo}: repository not found on {endpoint} (a private one needs HF_TOKEN)"
        ) from None
    except hf.RevisionNotFoundError:
        raise MissingResourceError(f"{repo}: revision {revision!r} not found") from None
    except hf.EntryNotFoundError as exc:
        last = (str(exc).splitlines() or [""])[-1]
        raise MissingResourceError(f"{repo}@{revision}: {shown(last, 300)}") from None
    except hf.OfflineModeIsEnabled:
        raise MissingResourceError("HF_HUB_OFFLINE is set: the hub cannot be contacted") from None
    except hf.HfHubHTTPError as exc:
        raise GrokctlError(
            f"{endpoint}: {shown((str(exc).splitlines() or [''])[0], 300)}"
        ) from None
    except httpx2.TransportError as exc:
        raise GrokctlError(f"cannot reach {endpoint} ({type(exc).__name__}: {exc})") from None


def plan_hub(
    root: Path,
    repo: str = DEFAULT_REPO,
    revision: str = DEFAULT_REVISION,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    manifest: Manifest | None = None,
) -> HubPlan:
    """What to fetch from `repo@revision` into `root`; contacts the hub (or reads the manifest
    when HF_HUB_OFFLINE is set)."""
    manifest = manifest or Manifest.load_or_new(root)
    endpoint = hub_endpoint()
    if hub_offline():
        return _plan_offline(root, repo, revision, include or [], exclude or [], manifest, endpoint)
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint)
    with _hub_errors(repo, revision, endpoint):
        commit = api.model_info(repo, revision=revision).sha or revision
        if commit != revision and not _HEX.fullmatch(str(commit)):
            raise IntegrityError(f"{repo}@{revision}: the hub's commit {shown(commit)} is not hex")
        entries = [
            e
            for e in api.list_repo_tree(repo, revision=commit, recursive=True)
            if isinstance(e, RepoFile)
        ]
    by_path = {}
    for e in entries:  # the whole listing is checked: one unsafe name means a hostile mirror
        check_relative_path(e.path, root, f"hub entry of {repo}")
        size = e.lfs.size if e.lfs else e.size
        sha256 = e.lfs.sha256 if e.lfs else None
        # the git object id is the content's only for files kept in git itself (for LFS and
        # Xet files it is the pointer's)
        blob_id = e.blob_id if not e.lfs and not getattr(e, "xet_hash", None) else None
        _check_listed(e.path, size, sha256, blob_id, repo)
        url = hf_hub_url(repo, e.path, revision=commit, endpoint=endpoint)
        by_path[e.path] = HubFile(e.path, size, sha256, blob_id, url)
    chosen = select(sorted(by_path), include or [], exclude or [])
    if not chosen:
        raise UsageError(f"no file of {repo}@{revision} matches --include/--exclude")
    files = [by_path[p] for p in chosen]
    plan = HubPlan(
        repo, revision, commit, endpoint, files, set(), set(), {}, by_path.get("tokenizer.model")
    )
    for f in files:
        dest = root / f.path
        rec = manifest.files.get(f.path)
        if dest.is_file() and dest.stat().st_size == f.size:
            same = (
                rec is not None
                and rec.downloaded
                and (rec.sha256 == f.sha256 if f.sha256 else rec.blob_id == f.blob_id)
            )
            (plan.present if same else plan.unverified).add(f.path)
            continue
        part = part_path(partial_dir(root), f.path, f.sha256 or f.blob_id)
        if part.is_file():
            plan.partial_bytes[f.path] = min(part.stat().st_size, f.size)
    return plan


_HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _check_listed(path: str, size: object, sha256: object, blob_id: object, repo: str) -> None:
    """The listing's size and checksums become file and part-file names and byte counts:
    a size is a non-negative integer, a checksum plain lowercase hex."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise IntegrityError(f"hub entry {shown(path)} of {repo}: size {shown(size)} is invalid")
    for what, value, width in (("sha256", sha256, 64), ("git object id", blob_id, 0)):
        if value is not None and not (
            isinstance(value, str) and _HEX.fullmatch(value) and (not width or len(value) == width)
        ):
            raise IntegrityError(
                f"hub entry {shown(path)} of {repo}: {what} {shown(value)} is not a hex digest"
            )


def _plan_offline(
    root: Path,
    repo: str,
    revision: str,
    include: list[str],
    exclude: list[str],
    manifest: Manifest,
    endpoint: str,
) -> HubPlan:
    if not manifest.files:
        raise MissingResourceError(
            f"HF_HUB_OFFLINE is set and {root} has no grokctl-manifest.json to work from"
        )
    chosen = select(sorted(manifest.files), include, exclude)
    files = [
        HubFile(p, manifest.files[p].size, manifest.files[p].sha256, manifest.files[p].blob_id, "")
        for p in chosen
    ]
    missing = [
        f.path
        for f in files
        if not ((root / f.path).is_file() and (root / f.path).stat().st_size == f.size)
    ]
    if missing:
        raise MissingResourceError(
            f"HF_HUB_OFFLINE is set and {len(missing)} file(s) are missing or incomplete in "
            f"{root} (first: {missing[0]})"
        )
    commits = [
        str(s["commit"]) for s in manifest.sources.values() if s.get("kind") == "huggingface"
    ]
    return HubPlan(
        repo,
        revision,
        commits[-1] if commits else "",
        endpoint,
        files,
        {f.path for f in files},
        set(),
        {},
        offline=True,
    )


@dataclasses.dataclass
class HubResult:
    plan: HubPlan
    downloaded: list[str]
    bytes_fetched: int
    bytes_resumed: int
    seconds: float


def download_hub(
    plan: HubPlan,
    root: Path,
    manifest: Manifest,
    *,
    max_workers: int = default("max_workers"),
    retries: int = RETRIES,
    timeout: float = HTTP_TIMEOUT_S,
    on_bytes: Callable[[int], None] | None = None,
    on_file: Callable[[str], None] | None = None,
) -> HubResult:
    """Fetch every file of `plan` not yet present; record each in the manifest when complete."""
    start = time.perf_counter()
    if plan.offline:
        return HubResult(plan, [], 0, 0, 0.0)
    source = manifest.add_source(
        f"hf:{plan.repo}@{plan.commit}",
        kind="huggingface",
        repo=plan.repo,
        revision=plan.revision,
        commit=plan.commit,
        endpoint=plan.endpoint,
    )
    for f in plan.files:
        if f.path not in plan.present:
            manifest.record(
                f.path,
                FileRecord(
                    f.size, f.sha256, "hub-lfs" if f.sha256 else None, source, None, f.blob_id
                ),
            )
    manifest.save()
    from huggingface_hub.utils import get_session

    session, headers = get_session(), hub_headers()
    cancel = threading.Event()
    downloaded: list[str] = []
    totals = {"fetched": 0, "resumed": 0}
    lock = threading.Lock()

    def one(f: HubFile) -> None:
        if f.path in plan.unverified and _matches_hub(root / f.path, f, on_bytes):
            manifest.mark_downloaded(
                f.path, _sha(root / f.path, f), "hub-lfs" if f.sha256 else "local"
            )
        else:
            if f.path in plan.unverified and on_bytes and f.sha256:
                on_bytes(-f.size)  # hashed for nothing: it differs from the hub's file
            part = part_path(partial_dir(root), f.path, f.sha256 or f.blob_id)
            t = Transfer(f.path, f.url, root / f.path, part, f.size, f.sha256, f.blob_id, headers)
            res = transfer(
                t, session, retries=retries, timeout=timeout, on_bytes=on_bytes, cancel=cancel
            )
            manifest.mark_downloaded(f.path, res.sha256, "local")
            with lock:
                downloaded.append(f.path)
                totals["fetched"] += res.fetched
                totals["resumed"] += res.resumed_from
        manifest.save(min_interval=2.0)
        if on_file:
            on_file(f.path)

    todo = [f for f in plan.files if f.path not in plan.present]
    errors: list[BaseException] = []
    # Not a `with` block: its exit would join every worker, also one still blocked after Ctrl-C.
    pool = cf.ThreadPoolExecutor(max_workers=max(1, max_workers))
    futures = [pool.submit(one, f) for f in todo]
    try:
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.5)
            errors.extend(e for fut in done if (e := fut.exception()) is not None)
    except BaseException:  # Ctrl-C: stop the transfers, keep their part files
        cancel.set()
        for fut in futures:
            fut.cancel()
        # The transfers' sockets are shut down on cancel, so they return at once; one that
        # is still blocked (e.g. waiting for response headers) is not waited for: the part
        # files and the manifest are what a rerun resumes from.
        cf.wait(futures, timeout=CANCEL_GRACE_S)
        manifest.save()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    manifest.save()
    prune_partial(root)
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if real:
        first = real[0]
        more = f" ({len(real) - 1} more file(s) failed too)" if len(real) > 1 else ""
        if isinstance(first, GrokctlError):
            raise type(first)(f"{first}{more}") from None
        raise first
    return HubResult(
        plan, downloaded, totals["fetched"], totals["resumed"], time.perf_counter() - start
    )


def _sha(path: Path, f: HubFile) -> str:
    return f.sha256 or sha256_file(path)


def _matches_hub(path: Path, f: HubFile, on_bytes: Callable[[int], None] | None) -> bool:
    """Is the file already at its final name the hub's file? (LFS sha256, else git blob id)"""
    if f.sha256:
        return sha256_file(path, on_bytes) == f.sha256
    if f.blob_id:
        return git_blob_sha1(path) == f.blob_id
    return False  # nothing to compare with: fetch it again
