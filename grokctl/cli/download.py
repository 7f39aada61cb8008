"""`grokctl download`: the Grok-1 checkpoint and tokenizer from Hugging Face or by magnet link."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from grokctl.cli import options
from grokctl.cli.output import emit_json, err, human_bytes, out, progress
from grokctl.config import Settings, help_suffix
from grokctl.errors import MissingResourceError, UsageError

BT = "BitTorrent (--magnet)"


TOK = "Tokenizer"

Patterns = list[str] | None


def download(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Hugging Face repo id (default xai-org/grok-1); with --magnet a magnet link or "
            ".torrent file (default: the official Grok-1 magnet). A magnet: link implies --magnet.",
            show_default=False,
        ),
    ] = None,
    magnet: Annotated[bool, typer.Option("--magnet", help="Download with BitTorrent.")] = False,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            "-d",
            help=f"Target directory. {help_suffix('checkpoint', default_text='./checkpoints')}",
            show_default=False,
        ),
    ] = None,
    include: Annotated[
        Patterns,
        typer.Option(
            "--include",
            help="Only files matching this pattern (repeatable or "
            "comma-separated; a bare directory such as `ckpt-0` needs no quoting). "
            "(default: ckpt-0/*)",
        ),
    ] = None,
    exclude: Annotated[
        Patterns, typer.Option("--exclude", help="Skip files matching this.")
    ] = None,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help=f"Branch, tag or commit. {help_suffix('revision')}"),
    ] = None,
    max_workers: Annotated[
        int | None,
        typer.Option("--max-workers", help=f"Parallel transfers. {help_suffix('max_workers')}"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the files and total size, check disk space.")
    ] = False,
    retries: Annotated[
        int | None, typer.Option("--retries", help=f"Retries per file. {help_suffix('retries')}")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            help="Give up after this many seconds without data. "
            f"{help_suffix('timeout', default_text='60 over HTTP, never over BitTorrent')}",
        ),
    ] = None,
    tokenizer_url: Annotated[
        str | None,
        typer.Option(
            "--tokenizer-url",
            help="Where to fetch tokenizer.model. "
            f"{help_suffix('tokenizer_url', default_text='the xai-org/grok-1 source tree')}",
            rich_help_panel=TOK,
        ),
    ] = None,
    tokenizer_from: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer-from", help="Use this local copy of tokenizer.model.", rich_help_panel=TOK
        ),
    ] = None,
    no_tokenizer: Annotated[
        bool,
        typer.Option("--no-tokenizer", help="Do not fetch tokenizer.model.", rich_help_panel=TOK),
    ] = False,
    seed: Annotated[
        bool,
        typer.Option(
            "--seed", help="Keep seeding after completion (Ctrl-C stops).", rich_help_panel=BT
        ),
    ] = False,
    peer: Annotated[
        Patterns,
        typer.Option(
            "--peer", help="Connect to this peer, HOST:PORT (repeatable).", rich_help_panel=BT
        ),
    ] = None,
    no_dht: Annotated[
        bool,
        typer.Option(
            "--no-dht", help="No DHT, local discovery, UPnP or NAT-PMP.", rich_help_panel=BT
        ),
    ] = False,
    no_trackers: Annotated[
        bool,
        typer.Option("--no-trackers", help="Ignore the magnet's trackers.", rich_help_panel=BT),
    ] = False,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            help="libtorrent listen interfaces. "
            + help_suffix("listen", default_text="0.0.0.0:6881 and \\[::]:6881"),
            rich_help_panel=BT,
        ),
    ] = None,
    json_out: options.Json = False,
) -> None:
    """Download the Grok-1 checkpoint (300 GB) and its tokenizer into a plain directory, resumably,
    and write grokctl-manifest.json (sizes, sha256, source) next to the files."""
    from grokctl.fetch.common import DEFAULT_INCLUDE, Interrupted, split_patterns
    from grokctl.fetch.manifest import Manifest
    from grokctl.fetch.torrent import OFFICIAL_MAGNET

    s = Settings("download")
    root = Path(s.get("checkpoint", directory, "checkpoints", kind=Path))
    inc = split_patterns(include) or list(DEFAULT_INCLUDE)
    exc = split_patterns(exclude)
    common = dict(
        retries=s.get("retries", retries, 5, kind=int),
        timeout=s.get("timeout", timeout, None, kind=float),
    )
    tok = dict(
        skip=no_tokenizer,
        url=s.get("tokenizer_url", tokenizer_url, None, kind=str),
        from_path=tokenizer_from,
    )
    _check_dir(root, s.source("checkpoint"))
    _check_tokenizer_source(tok, s.source("tokenizer_url"))
    manifest = Manifest.load_or_new(root)
    bt = magnet or (source or "").startswith("magnet:") or (source or "").endswith(".torrent")
    try:
        if bt:
            from grokctl.fetch.torrent import DEFAULT_LISTEN, TorrentOptions, parse_peer

            peers = [parse_peer(p) for p in split_patterns(peer)]
            opts = TorrentOptions(
                inc, exc, s.get("listen", listen, DEFAULT_LISTEN), not no_dht, not no_trackers,
                peers, seed, common["timeout"] or 0.0, dry_run=dry_run,
            )  # fmt: skip
            uri = source or s.get("magnet", None, OFFICIAL_MAGNET)
            result = _magnet(uri, root, manifest, opts, tok, common, json_out)
        else:
            repo = source or s.get("repo", None, "xai-org/grok-1")
            rev = s.get("revision", revision, "main")
            workers = s.get("max_workers", max_workers, 8, kind=int)
            result = _hub(
                repo, rev, root, manifest, inc, exc, workers, dry_run, tok, common, json_out
            )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; what was fetched is kept under {root}: run the same command to resume"
        ) from None
    if json_out:
        emit_json(result)


def _check_dir(root: Path, where: str) -> None:
    """--dir must be a directory (or not exist yet): refused before anything is fetched."""
    if where in ("--checkpoint", "default"):
        where = "--dir"
    if root.exists() and not root.is_dir():
        raise UsageError(f"{where} {root}: exists and is not a directory")
    parent = next((p for p in (root, *root.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{where} {root}: {parent} is not a directory")


def _check_tokenizer_source(tok: dict[str, Any], url_where: str) -> None:
    """The tokenizer's source is checked before any transfer: a missing --tokenizer-from file
    (exit 4) or a malformed --tokenizer-url (exit 2) fails at once, not after 300 GB."""
    if tok["skip"]:
        return
    src = tok["from_path"]
    if src is not None and not src.is_file():
        what = "is not a file" if src.exists() else "no such file"
        raise MissingResourceError(f"--tokenizer-from {src}: {what}")
    url = tok["url"]
    if url is not None and src is None:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise UsageError(f"{url_where} {url!r}: not a URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"{url_where} {url!r}: expected an http(s)://HOST/... URL of tokenizer.model"
            )


def _hub(
    repo: str,
    revision: str,
    root: Path,
    manifest: Any,
    inc: list[str],
    exc: list[str],
    max_workers: int,
    dry_run: bool,
    tok: dict[str, Any],
    common: dict[str, Any],
    json_out: bool,
) -> dict[str, Any]:
    from grokctl.fetch.common import check_disk_space
    from grokctl.fetch.hub import download_hub, hub_headers, plan_hub
    from grokctl.paths import shown

    plan = plan_hub(root, repo, revision, inc, exc, manifest)
    tok_needed = 0 if tok["skip"] or (root / "tokenizer.model").is_file() else 2_229_219
    free = check_disk_space(root, plan.bytes_needed + tok_needed)
    if dry_run:
        return _dry_run({**plan.to_json(), "checkpoint": str(root), "free_bytes": free}, json_out)
    timeout = common["timeout"] or 60.0
    n = len(plan.files)
    done = [len(plan.present)]
    with progress("bytes", enabled=not json_out) as bar:
        present = sum(f.size for f in plan.files if f.path in plan.present)
        task = bar.add_task(
            f"{repo} {done[0]}/{n} files", total=plan.bytes_total, completed=present
        )

        def on_file(path: str) -> None:
            done[0] += 1
            bar.update(task, description=f"{repo} {done[0]}/{n} files")

        res = download_hub(
            plan,
            root,
            manifest,
            max_workers=max_workers,
            retries=common["retries"],
            timeout=timeout,
            on_bytes=lambda b: bar.advance(task, b),
            on_file=on_file,
        )
    url, headers = tok["url"], {}
    if url is None and plan.tokenizer is not None:  # the repo has its own copy
        url, headers = plan.tokenizer.url, hub_headers()
    mbps = res.bytes_fetched / res.seconds / 1e6 if res.seconds else 0.0
    if not json_out:
        got = (
            f"{len(res.downloaded)} downloaded ({human_bytes(res.bytes_fetched)} in "
            f"{res.seconds:.1f} s, {mbps:.1f} MB/s"
            + (f", {human_bytes(res.bytes_resumed)} resumed" if res.bytes_resumed else "")
            + ")"
            if res.downloaded
            else "all already present"
        )
        _line(  # the result: stdout
            f"{repo}@{shown(plan.commit[:12])}: {n} files ({human_bytes(plan.bytes_total)}), {got} "
            f"in {root}; manifest {manifest.path.name}"
        )
    tokr = _tokenizer(root, manifest, tok, url, headers, plan.offline, common, json_out)
    return {
        "source": "huggingface",
        "repo": repo,
        "revision": revision,
        "commit": plan.commit,
        "endpoint": plan.endpoint,
        "checkpoint": str(root),
        "files": n,
        "downloaded": len(res.downloaded),
        "bytes": plan.bytes_total,
        "bytes_fetched": res.bytes_fetched,
        "bytes_resumed": res.bytes_resumed,
        "seconds": round(res.seconds, 3),
        "mb_per_s": round(mbps, 2),
        "manifest": str(manifest.path),
        "tokenizer": tokr,
    }


def _magnet(
    source: str,
    root: Path,
    manifest: Any,
    opts: Any,
    tok: dict[str, Any],
    common: dict[str, Any],
    json_out: bool,
) -> dict[str, Any]:
    from grokctl.fetch.torrent import download_magnet
    from grokctl.paths import shown

    with progress("bytes", enabled=not json_out) as bar:
        task = bar.add_task("magnet: fetching metadata", total=None)

        def on_status(st: Any) -> None:
            bar.update(
                task,
                completed=st.done,
                total=st.total or None,
                description=f"magnet {st.peers} peers {st.state}",
            )

        result: dict[str, Any] = {"source": "magnet", "checkpoint": str(root)}

        def on_complete(res: Any) -> None:  # before seeding starts
            result.update(res.to_json(), manifest=str(manifest.path))
            if res.dry_run:
                return
            if not json_out:
                rate = res.bytes_fetched / res.seconds / 1e6 if res.seconds else 0.0
                _line(
                    f"magnet {res.info_hash[:12]} ({shown(res.name)}): {len(res.files)} files "
                    f"({human_bytes(res.bytes_total)}), {human_bytes(res.bytes_fetched)} fetched "
                    f"in {res.seconds:.1f} s ({rate:.1f} MB/s, {res.hash_failures} failed piece "
                    f"checks) into {root}; manifest {manifest.path.name}"
                )
            tokr = _tokenizer(root, manifest, tok, tok["url"], {}, False, common, json_out)
            result["tokenizer"] = tokr
            if opts.seed:
                _note("download complete; seeding (Ctrl-C to stop)")

        res = download_magnet(source, root, manifest, opts, on_status, on_complete)
    result.update(res.to_json(), manifest=str(manifest.path))
    return _dry_run(result, json_out) if opts.dry_run else result


def _tokenizer(
    root: Path,
    manifest: Any,
    tok: dict[str, Any],
    url: str | None,
    headers: dict[str, str],
    offline: bool,
    common: dict[str, Any],
    json_out: bool,
) -> dict[str, Any] | None:
    if tok["skip"]:
        return None
    from grokctl.fetch.hub import hub_offline
    from grokctl.fetch.tokenizer_fetch import TOKENIZER_URL, fetch_tokenizer

    res = fetch_tokenizer(
        root,
        manifest,
        from_path=tok["from_path"],
        url=url or TOKENIZER_URL,
        headers=headers,
        offline=offline or hub_offline(),
        retries=common["retries"],
        timeout=common["timeout"] or 60.0,
    )
    if not json_out:
        _line(f"tokenizer.model: {res.action} (sha256 {res.sha256[:16]}… matches the pinned hash)")
    return res.to_json()


def _dry_run(plan: dict[str, Any], json_out: bool) -> dict[str, Any]:
    if not json_out:
        for f in plan["listing"]:
            state = "present" if f["present"] else "to fetch"
            _line(f"{human_bytes(f['size']):>10}  {f['path']}  ({state})")
        needed = plan.get(
            "bytes_needed", sum(f["size"] for f in plan["listing"] if not f["present"])
        )
        free = f", {human_bytes(plan['free_bytes'])} free" if "free_bytes" in plan else ""
        _line(
            f"{plan['files']} files, {human_bytes(plan['bytes'])} in all, "
            f"{human_bytes(needed)} to fetch into {plan['checkpoint']}{free} (dry run: nothing fetched)"
        )
    return {**plan, "dry_run": True}


def _note(text: str) -> None:
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def _line(text: str) -> None:
    out.print(text, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("download")(download)
