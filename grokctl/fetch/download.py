"""One call for a whole download: `download(DownloadRequest) -> DownloadResult`.

It checks the target directory and the tokenizer's source before any transfer, plans the files
(Hugging Face listing or torrent metadata), checks the disk (checkpoint and tokenizer together),
fetches, brings the pinned tokenizer, and returns what happened. What it has to say while it runs
goes to `DownloadHooks` (progress, "files in place", "tokenizer done", "seeding"); it prints
nothing itself, so the CLI (`grokctl download`), the API and tests all use it the same way.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from grokctl.config import default
from grokctl.errors import MissingResourceError, UsageError
from grokctl.fetch.common import DEFAULT_INCLUDE, Interrupted, check_disk_space
from grokctl.fetch.http import HTTP_TIMEOUT_S, RETRIES
from grokctl.fetch.manifest import Manifest
from grokctl.fetch.tokenizer_fetch import TokenizerResult
from grokctl.tokenizer import GROK1_TOKENIZER_BYTES, TOKENIZER_FILENAME


@dataclasses.dataclass
class DownloadRequest:
    """What to fetch and how; defaults are those of `grokctl.config.SETTINGS`.

    `source`: a hub repo id, or (with `magnet`, or when it is one) a magnet link or .torrent file;
    None for the default of its kind. `timeout` None: 60 s over HTTP, never over BitTorrent."""

    directory: Path = dataclasses.field(default_factory=lambda: default("checkpoint", "download"))
    source: str | None = None
    magnet: bool = False
    include: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = dataclasses.field(default_factory=list)
    revision: str = default("revision")
    max_workers: int = default("max_workers")
    retries: int = RETRIES
    timeout: float | None = default("timeout")
    dry_run: bool = False
    # tokenizer.model: skipped, from a local copy, or from a URL (None: the repo's or xai-org's)
    tokenizer: bool = True
    tokenizer_from: Path | None = None
    tokenizer_url: str | None = default("tokenizer_url")
    # BitTorrent only
    seed: bool = False
    peers: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    dht: bool = True
    trackers: bool = True
    listen: str = default("listen")
    # Where a setting came from, for error messages ("--dir", "GROKCTL_CHECKPOINT", "FILE: key")
    directory_source: str = "--dir"
    tokenizer_url_source: str = "--tokenizer-url"

    @property
    def bittorrent(self) -> bool:
        src = self.source or ""
        return self.magnet or src.startswith("magnet:") or src.endswith(".torrent")


@dataclasses.dataclass
class DownloadHooks:
    """What a download reports while it runs; every hook is optional.

    progress(description, done bytes, total bytes or None) - may be called from worker threads;
    fetched(result) - the checkpoint's files are in place (before the tokenizer; `result` has no
    tokenizer yet); tokenizer(result); seeding() - complete, now seeding until Ctrl-C."""

    progress: Callable[[str, int, int | None], None] | None = None
    fetched: Callable[[DownloadResult], None] | None = None
    tokenizer: Callable[[TokenizerResult], None] | None = None
    seeding: Callable[[], None] | None = None


@dataclasses.dataclass
class DownloadResult:
    """What a download did: `hub` (a `HubResult`) or `torrent` (a `TorrentResult`), the
    tokenizer's result, and for a hub dry run its plan and the free bytes."""

    request: DownloadRequest
    manifest: Path
    hub: Any = None  # grokctl.fetch.hub.HubResult
    hub_plan: Any = None  # grokctl.fetch.hub.HubPlan
    torrent: Any = None  # grokctl.fetch.torrent.TorrentResult
    tokenizer: TokenizerResult | None = None
    free_bytes: int | None = None

    @property
    def dry_run(self) -> bool:
        return self.request.dry_run

    @property
    def mb_per_s(self) -> float:
        res = self.hub or self.torrent
        return res.bytes_fetched / res.seconds / 1e6 if res is not None and res.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        """The record `grokctl download --json` prints (docs/download.md)."""
        root = str(self.request.directory)
        tok = self.tokenizer.to_json() if self.tokenizer is not None else None
        if self.torrent is not None:
            out = {"source": "magnet", "checkpoint": root, **self.torrent.to_json()}
            out["manifest"] = str(self.manifest)
            if not self.dry_run:
                out["tokenizer"] = tok
            return {**out, "dry_run": True} if self.dry_run else out
        plan = self.hub_plan
        if self.dry_run:
            return {
                **plan.to_json(),
                "checkpoint": root,
                "free_bytes": self.free_bytes,
                "dry_run": True,
            }
        res = self.hub
        return {
            "source": "huggingface",
            "repo": plan.repo,
            "revision": self.request.revision,
            "commit": plan.commit,
            "endpoint": plan.endpoint,
            "checkpoint": root,
            "files": len(plan.files),
            "downloaded": len(res.downloaded),
            "bytes": plan.bytes_total,
            "bytes_fetched": res.bytes_fetched,
            "bytes_resumed": res.bytes_resumed,
            "seconds": round(res.seconds, 3),
            "mb_per_s": round(self.mb_per_s, 2),
            "manifest": str(self.manifest),
            "tokenizer": tok,
        }


def download(req: DownloadRequest, hooks: DownloadHooks | None = None) -> DownloadResult:
    """Fetch the checkpoint (and tokenizer.model) of `req` into `req.directory` resumably and
    record grokctl-manifest.json. Ctrl-C raises `Interrupted` (exit 130), keeping what was
    fetched for the next run."""
    hooks = hooks or DownloadHooks()
    check_directory(req.directory, req.directory_source)
    check_tokenizer_source(req)
    manifest = Manifest.load_or_new(req.directory)
    try:
        if req.bittorrent:
            return _magnet(req, manifest, hooks)
        return _hub(req, manifest, hooks)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; what was fetched is kept under {req.directory}: "
            "run the same command to resume"
        ) from None


def check_directory(root: Path, where: str = "--dir") -> None:
    """The target must be a directory (or not exist yet): refused before anything is fetched."""
    if where in ("--checkpoint", "default"):
        where = "--dir"
    if root.exists() and not root.is_dir():
        raise UsageError(f"{where} {root}: exists and is not a directory")
    parent = next((p for p in (root, *root.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{where} {root}: {parent} is not a directory")


def check_tokenizer_source(req: DownloadRequest) -> None:
    """The tokenizer's source is checked before any transfer: a missing `tokenizer_from` file
    (exit 4) or a malformed `tokenizer_url` (exit 2) fails at once, not after 300 GB."""
    if not req.tokenizer:
        return
    src = req.tokenizer_from
    if src is not None and not src.is_file():
        what = "is not a file" if src.exists() else "no such file"
        raise MissingResourceError(f"--tokenizer-from {src}: {what}")
    url, where = req.tokenizer_url, req.tokenizer_url_source
    if url is not None and src is None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise UsageError(f"{where} {url!r}: not a URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"{where} {url!r}: expected an http(s)://HOST/... URL of tokenizer.model"
            )


def tokenizer_bytes_needed(req: DownloadRequest) -> int:
    """Disk the tokenizer still needs (0 when skipped or already there)."""
    if not req.tokenizer or (req.directory / TOKENIZER_FILENAME).is_file():
        return 0
    return GROK1_TOKENIZER_BYTES


def _hub(req: DownloadRequest, manifest: Manifest, hooks: DownloadHooks) -> DownloadResult:
    from grokctl.fetch.hub import download_hub, hub_headers, plan_hub

    root = req.directory
    repo = req.source or default("repo")
    plan = plan_hub(root, repo, req.revision, req.include, req.exclude, manifest)
    free = check_disk_space(root, plan.bytes_needed + tokenizer_bytes_needed(req))
    result = DownloadResult(req, manifest.path, hub_plan=plan, free_bytes=free)
    if req.dry_run:
        return result
    n = len(plan.files)
    lock = threading.Lock()
    present = sum(f.size for f in plan.files if f.path in plan.present)
    state = {"files": len(plan.present), "bytes": present}

    def report(files: int = 0, nbytes: int = 0) -> None:
        with lock:
            state["files"] += files
            state["bytes"] += nbytes
            if hooks.progress:
                hooks.progress(
                    f"{repo} {state['files']}/{n} files", state["bytes"], plan.bytes_total
                )

    report()
    result.hub = download_hub(
        plan,
        root,
        manifest,
        max_workers=req.max_workers,
        retries=req.retries,
        timeout=req.timeout or HTTP_TIMEOUT_S,
        on_bytes=lambda b: report(nbytes=b),
        on_file=lambda path: report(files=1),
    )
    if hooks.fetched:
        hooks.fetched(result)
    url, headers = req.tokenizer_url, {}
    if url is None and plan.tokenizer is not None:  # the repo has its own copy
        url, headers = plan.tokenizer.url, hub_headers()
    result.tokenizer = _tokenizer(req, manifest, url, headers, plan.offline, hooks)
    return result


def _magnet(req: DownloadRequest, manifest: Manifest, hooks: DownloadHooks) -> DownloadResult:
    from grokctl.fetch.torrent import TorrentOptions, TorrentResult, TorrentStatus, download_magnet

    opts = TorrentOptions(
        req.include, req.exclude, req.listen, req.dht, req.trackers, req.peers, req.seed,
        req.timeout or 0.0, dry_run=req.dry_run,
    )  # fmt: skip
    result = DownloadResult(req, manifest.path)
    if hooks.progress:
        hooks.progress("magnet: fetching metadata", 0, None)

    def on_status(st: TorrentStatus) -> None:
        if hooks.progress:
            hooks.progress(f"magnet {st.peers} peers {st.state}", st.done, st.total or None)

    def on_complete(res: TorrentResult) -> None:  # before seeding starts
        result.torrent = res
        if res.dry_run:
            return
        if hooks.fetched:
            hooks.fetched(result)
        result.tokenizer = _tokenizer(req, manifest, req.tokenizer_url, {}, False, hooks)
        if req.seed and hooks.seeding:
            hooks.seeding()

    result.torrent = download_magnet(
        req.source or default("magnet"), req.directory, manifest, opts, on_status, on_complete
    )
    return result


def _tokenizer(
    req: DownloadRequest,
    manifest: Manifest,
    url: str | None,
    headers: dict[str, str],
    offline: bool,
    hooks: DownloadHooks,
) -> TokenizerResult | None:
    if not req.tokenizer:
        return None
    from grokctl.fetch.hub import hub_offline
    from grokctl.fetch.tokenizer_fetch import TOKENIZER_URL, fetch_tokenizer

    res = fetch_tokenizer(
        req.directory,
        manifest,
        from_path=req.tokenizer_from,
        url=url or TOKENIZER_URL,
        headers=headers,
        offline=offline or hub_offline(),
        retries=req.retries,
        timeout=req.timeout or HTTP_TIMEOUT_S,
    )
    if hooks.tokenizer:
        hooks.tokenizer(res)
    return res
