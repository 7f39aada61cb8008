"""`grokctl download`: the Grok-1 checkpoint and tokenizer from Hugging Face or by magnet link."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from grokctl.cli import options
from grokctl.cli.output import emit_json, err, human_bytes, out, progress
from grokctl.config import Settings, default, help_suffix

if TYPE_CHECKING:
    from grokctl.fetch.download import DownloadResult
    from grokctl.fetch.tokenizer_fetch import TokenizerResult

BT = "BitTorrent (--magnet)"


TOK = "Tokenizer"
# "0.0.0.0:6881 and \[::]:6881" (`[` escaped for rich markup)
_LISTEN_SHOWN = " and ".join(default("listen").split(",")).replace("[", "\\[")

Patterns = list[str] | None


def download(
    source: Annotated[
        str | None,
        typer.Argument(
            help=f"Hugging Face repo id (default {default('repo')}); with --magnet a magnet link or "
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
            help="Target directory. "
            + help_suffix("checkpoint", default_text=f"./{default('checkpoint', 'download')}"),
            show_default=False,
        ),
    ] = None,
    include: Annotated[
        Patterns,
        typer.Option(
            "--include",
            help="Only files matching this pattern (repeatable or "
            "comma-separated; a bare directory such as `ckpt-0` needs no quoting; "
            "default: ckpt-0/*).",
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
        int | None,
        typer.Option("--retries", help=f"Retries per file. {help_suffix('retries')}"),
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
            + help_suffix("listen", default_text=_LISTEN_SHOWN),
            rich_help_panel=BT,
        ),
    ] = None,
    json_out: options.Json = False,
) -> None:
    """Download the Grok-1 checkpoint (300 GB) and its tokenizer into a plain directory, resumably,
    and write grokctl-manifest.json (sizes, sha256, source) next to the files."""
    from grokctl.fetch.common import DEFAULT_INCLUDE, split_patterns
    from grokctl.fetch.download import DownloadHooks, DownloadRequest, download

    s = Settings("download")
    req = DownloadRequest(
        directory=Path(s.get("checkpoint", directory)),
        source=source,
        magnet=magnet,
        include=split_patterns(include) or list(DEFAULT_INCLUDE),
        exclude=split_patterns(exclude),
        revision=s.get("revision", revision),
        max_workers=s.get("max_workers", max_workers),
        retries=s.get("retries", retries),
        timeout=s.get("timeout", timeout),
        dry_run=dry_run,
        tokenizer=not no_tokenizer,
        tokenizer_from=tokenizer_from,
        tokenizer_url=s.get("tokenizer_url", tokenizer_url),
        seed=seed,
        dht=not no_dht,
        trackers=not no_trackers,
        listen=s.get("listen", listen),
        directory_source=s.source("checkpoint"),
        tokenizer_url_source=s.source("tokenizer_url"),
    )
    if req.bittorrent:
        from grokctl.fetch.torrent import parse_peer

        req.peers = [parse_peer(p) for p in split_patterns(peer)]
        req.source = source or s.get("magnet")
    else:
        req.source = source or s.get("repo")
    with progress("bytes", enabled=not json_out) as bar:
        task = bar.add_task("download", total=None)

        def on_progress(description: str, done: int, total: int | None) -> None:
            bar.update(task, description=description, completed=done, total=total)

        hooks = DownloadHooks(progress=on_progress)
        if not json_out:
            hooks.fetched, hooks.tokenizer = _fetched_note, _tokenizer_note
            hooks.seeding = lambda: _note("download complete; seeding (Ctrl-C to stop)")
        result = download(req, hooks)
    record = result.to_json()
    if result.dry_run and not json_out:
        _dry_run(record)
    if json_out:
        emit_json(record)


def _fetched_note(res: DownloadResult) -> None:
    """One line when the checkpoint's files are in place (before the tokenizer)."""
    from grokctl.paths import shown

    root, manifest = res.request.directory, res.manifest.name
    if res.torrent is not None:
        t = res.torrent
        _line(  # the result: stdout
            f"magnet {t.info_hash[:12]} ({shown(t.name)}): {len(t.files)} files "
            f"({human_bytes(t.bytes_total)}), {human_bytes(t.bytes_fetched)} fetched "
            f"in {t.seconds:.1f} s ({res.mb_per_s:.1f} MB/s, {t.hash_failures} failed piece "
            f"checks) into {root}; manifest {manifest}"
        )
        return
    plan, hub = res.hub_plan, res.hub
    got = (
        f"{len(hub.downloaded)} downloaded ({human_bytes(hub.bytes_fetched)} in "
        f"{hub.seconds:.1f} s, {res.mb_per_s:.1f} MB/s"
        + (f", {human_bytes(hub.bytes_resumed)} resumed" if hub.bytes_resumed else "")
        + ")"
        if hub.downloaded
        else "all already present"
    )
    _line(  # the result: stdout
        f"{plan.repo}@{shown(plan.commit[:12])}: {len(plan.files)} files "
        f"({human_bytes(plan.bytes_total)}), {got} in {root}; manifest {manifest}"
    )


def _tokenizer_note(res: TokenizerResult) -> None:
    _line(f"tokenizer.model: {res.action} (sha256 {res.sha256[:16]}… matches the pinned hash)")


def _dry_run(plan: dict[str, Any]) -> None:
    """The listing of a dry run: each file, then the totals and the free space."""
    for f in plan["listing"]:
        state = "present" if f["present"] else "to fetch"
        _line(f"{human_bytes(f['size']):>10}  {f['path']}  ({state})")
    needed = plan.get("bytes_needed", sum(f["size"] for f in plan["listing"] if not f["present"]))
    free = f", {human_bytes(plan['free_bytes'])} free" if "free_bytes" in plan else ""
    _line(
        f"{plan['files']} files, {human_bytes(plan['bytes'])} in all, "
        f"{human_bytes(needed)} to fetch into {plan['checkpoint']}{free} (dry run: nothing fetched)"
    )


def _note(text: str) -> None:
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def _line(text: str) -> None:
    out.print(text, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("download")(download)
