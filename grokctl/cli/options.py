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
Coordinator = Annotated[
    Optional[str],
    typer.Option(
        "--coordinator",
        help="HOST:PORT of process 0 for a multi-host run (jax.distributed). Env: GROKCTL_COORDINATOR.",
        rich_help_panel="Multi-host",
    ),
]
NumProcesses = Annotated[
    Optional[int],
    typer.Option(
        "--num-processes", min=1, help="Processes in the run.", rich_help_panel="Multi-host"
    ),
]
ProcessId = Annotated[
    Optional[int],
    typer.Option("--process-id", min=0, help="This process's rank.", rich_help_panel="Multi-host"),
]
MoeKernel = Annotated[
    Optional[str],
    typer.Option(
        "--moe",
        help="MoE kernel: sparse (selected experts only) or dense (the reference's all-experts baseline).",
    ),
]
Layout = Annotated[
    Optional[str],
    typer.Option(
        "--layout", help="MoE weight layout: tensor (shard the FFN dim) or expert (shard experts)."
    ),
]
