"""Shared command-line options (one definition each, reused by every command).

Defaults and constraints come from the one table, `grokctl.config.SETTINGS`: every option
defaults to None here so that a value not given on the command line resolves through
`Settings` (GROKCTL_* environment, then grokctl.toml, then the table's default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from grokctl.config import PRESETS, Settings, help_suffix
from grokctl.errors import UsageError

MODEL = "Model and devices"  # a help panel of its own: its choices need a wide metavar column

Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
# The checkpoint a command reads: `grokctl CMD DIR` and `grokctl CMD -c DIR` are the same.
CheckpointArg = Annotated[
    Optional[Path],
    typer.Argument(
        metavar="CHECKPOINT",
        help="Checkpoint directory (holding ckpt-0/); the same as -c/--checkpoint.",
        show_default=False,
    ),
]
Checkpoint = Annotated[
    Optional[Path],
    typer.Option(
        "--checkpoint",
        "-c",
        metavar="DIR",
        help=f"Checkpoint directory (holding ckpt-0/). {help_suffix('checkpoint')}",
        show_default=False,
    ),
]


def checkpoint(
    settings: Settings, positional: Path | None, option: Path | None, default: Any = None
) -> Path | None:
    """The checkpoint named by the positional argument or -c/--checkpoint (the same value
    twice is fine, two different ones are a usage error), else GROKCTL_CHECKPOINT, the
    grokctl.toml key, or `default`."""
    if positional is not None and option is not None and positional != option:
        raise UsageError(f"two checkpoints given: {positional} and --checkpoint {option}; give one")
    value = settings.get("checkpoint", option if option is not None else positional, default)
    return Path(value) if value is not None else None


Preset = Annotated[
    Optional[str],
    typer.Option(
        "--preset",
        help=f"Model preset: {', '.join(PRESETS)}; without config.json grok-1 is assumed. "
        f"{help_suffix('preset')}",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Mesh = Annotated[
    Optional[str],
    typer.Option(
        "--mesh",
        metavar="DxM",
        help="Device mesh (data x model), e.g. 1x8. "
        f"{help_suffix('mesh', default_text='all local devices on the model axis')}",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Seed = Annotated[Optional[int], typer.Option("--seed", help=f"Random seed. {help_suffix('seed')}")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Coordinator = Annotated[
    Optional[str],
    typer.Option(
        "--coordinator",
        help="HOST:PORT of process 0 for a multi-host run (jax.distributed). "
        f"{help_suffix('coordinator')}",
        rich_help_panel="Multi-host",
        show_default=False,
    ),
]
NumProcesses = Annotated[
    Optional[int],
    typer.Option(
        "--num-processes",
        help=f"Processes in the run. {help_suffix('num_processes')}",
        rich_help_panel="Multi-host",
        show_default=False,
    ),
]
ProcessId = Annotated[
    Optional[int],
    typer.Option(
        "--process-id",
        help=f"This process's rank. {help_suffix('process_id')}",
        rich_help_panel="Multi-host",
        show_default=False,
    ),
]
MoeKernel = Annotated[
    Optional[str],
    typer.Option(
        "--moe",
        help="MoE kernel: sparse (selected experts only) or dense (the reference's all-experts "
        f"baseline). {help_suffix('moe')}",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Layout = Annotated[
    Optional[str],
    typer.Option(
        "--layout",
        help="MoE weight layout: tensor (shard the FFN dim) or expert (shard experts). "
        f"{help_suffix('layout')}",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
