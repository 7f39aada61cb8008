"""Shared command-line options (one definition each, reused by every command)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Checkpoint = Annotated[
    Optional[Path],
    typer.Option(
        "--checkpoint",
        "-c",
        help="Checkpoint directory (holding ckpt-0/). Env: GROKCTL_CHECKPOINT.",
        show_default=False,
    ),
]
Preset = Annotated[
    Optional[str],
    typer.Option("--preset", help="Model preset (grok-1, grok-demo, grok-tiny, grok-bench)."),
]
Mesh = Annotated[
    Optional[str],
    typer.Option(
        "--mesh",
        help="Device mesh DxM (data x model), e.g. 1x8. Default: all local devices on 'model'.",
    ),
]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
