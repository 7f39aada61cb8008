"""`grokctl verify`: prove a checkpoint directory complete and intact (exit 3 when it is not)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from grokctl.cli import options
from grokctl.cli.output import emit_json, human_bytes, out, progress
from grokctl.config import Settings, help_suffix
from grokctl.errors import IntegrityError
from grokctl.paths import shown

DEFAULT_DIR = "checkpoints"  # where `download` puts the checkpoint by default


def verify(
    directory: options.CheckpointArg = None,
    checkpoint: options.Checkpoint = None,
    deep: Annotated[
        bool, typer.Option("--deep", help="Also scan every float tensor for NaN/Inf.")
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Sizes and structure only: skip the sha256 pass.")
    ] = False,
    torrent: Annotated[
        bool,
        typer.Option(
            "--torrent",
            help="Re-check every piece against the torrent's hashes "
            "(grokctl.torrent, saved by download --magnet).",
        ),
    ] = False,
    torrent_file: Annotated[
        Path | None, typer.Option("--torrent-file", help="The .torrent to check pieces against.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help=f"Hashing threads. {help_suffix('workers', default_text='all cores')}",
            show_default=False,
        ),
    ] = None,
    preset: options.Preset = None,
    json_out: options.Json = False,
) -> None:
    """Check sizes (against grokctl-manifest.json, or the released 770-file layout without one),
    tensor structure, sha256 and optionally NaN/Inf and torrent pieces. Exit 0 when all is well,
    3 on any missing or corrupt file."""
    from grokctl.fetch.common import Interrupted
    from grokctl.verify import verify_checkpoint

    s = Settings("verify")
    root = options.checkpoint(s, directory, checkpoint, DEFAULT_DIR) or Path(DEFAULT_DIR)
    with progress("bytes", enabled=not json_out) as bar:

        def on_phase(desc: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(desc, total=total)
            return lambda n: bar.advance(task, n)

        try:
            report = verify_checkpoint(
                root,
                preset=s.get("preset", preset),
                deep=deep,
                quick=quick,
                torrent=torrent,
                torrent_file=torrent_file,
                workers=s.get("workers", workers, None, kind=int),
                on_phase=on_phase,
            )
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {root} was not fully verified") from None
    if json_out:
        emit_json(report.to_json())
    else:
        _print(report)
    if not report.ok:
        unverified = f", {len(report.unverified)} unverified" if report.unverified else ""
        raise IntegrityError(
            f"{report.root}: {len(report.missing)} missing, {len(report.corrupt)} corrupt"
            f"{unverified} file(s)"
        )


def _print(report: Any) -> None:
    against = f"the layout of {report.model}" + (
        " and grokctl-manifest.json" if report.mode == "manifest" else ""
    )
    _line(
        f"{report.root}: {report.files} files, {human_bytes(report.bytes)}, checked against {against}"
    )
    for name in ("manifest", "sizes", "structure", "nan_inf", "sha256", "torrent"):
        if name in report.checks:
            _line(f"  {name:<10} {report.checks[name]}")
    for f in report.missing:
        _line(f"missing     {shown(f.path)}")
    for f in report.corrupt:
        _line(f"corrupt     {shown(f.path)}: {shown(f.detail, 400)}")
    for f in report.unverified:
        _line(f"unverified  {shown(f.path)}: {f.detail}")
    for f in report.unexpected:
        _line(f"unexpected  {shown(f.path)} ({f.detail})")
    for w in report.warnings:
        _line(f"note        {w}")
    verdict = (
        "OK" if report.ok else "UNVERIFIED" if not report.missing + report.corrupt else "FAILED"
    )
    _line(f"{verdict} in {report.seconds:.1f} s")


def _line(text: str) -> None:
    out.print(text, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
