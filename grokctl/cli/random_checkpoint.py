"""`grokctl random-checkpoint`: a random-weight checkpoint in the exact released format."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from grokctl.cli import options
from grokctl.cli.output import emit_json, human_bytes, out, progress
from grokctl.config import PRESETS, Settings, default, help_suffix
from grokctl.errors import MissingResourceError, UsageError

DEFAULT_PRESET: str = default("preset", "random-checkpoint")


def check_output_dir(out_dir: Path) -> None:
    """The output must be a directory or not exist, under a writable directory: refused at
    once with one line (exit 2 for a file in the way, 4 for a place that cannot be written)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory")
    parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if parent is None:
        return
    if not parent.is_dir():
        raise UsageError(f"{out_dir}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MissingResourceError(f"{out_dir}: cannot write in {parent} (permission denied)")


def random_checkpoint(
    out_dir: Annotated[
        Path, typer.Argument(help="Directory to create (ckpt-0/, config.json, tokenizer.model).")
    ],
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help=f"Architecture preset: {', '.join(PRESETS)}. {help_suffix('preset', DEFAULT_PRESET)}",
            show_default=False,
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Architecture as a config.json (its keys override the preset's).",
        ),
    ] = None,
    seed: options.Seed = None,
    layers: Annotated[
        int | None,
        typer.Option(
            "--layers",
            help=f"Override the preset's layer count. {help_suffix('layers')}",
            show_default=False,
        ),
    ] = None,
    force: options.Force = False,
    json_out: options.Json = False,
) -> None:
    """Write a random-weight checkpoint of a preset: int8 weights with block scales, f32 norms,
    router and embeddings, config.json and a small SentencePiece tokenizer."""
    import dataclasses

    from grokctl.checkpoint.index import CheckpointIndex
    from grokctl.checkpoint.xai.writer import write_random_checkpoint
    from grokctl.config import model_config_from_dict
    from grokctl.config import preset as get_preset
    from grokctl.errors import MissingResourceError, UsageError

    st = Settings("random-checkpoint")
    preset_name = st.get("preset", preset)
    seed_value = st.get("seed", seed)
    layers = st.get("layers", layers)
    cfg = get_preset(preset_name)
    if config_file is not None:
        try:
            data = json.loads(config_file.read_text())
        except FileNotFoundError:
            raise MissingResourceError(f"--config {config_file}: no such file") from None
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"--config {config_file}: not a readable JSON config ({exc})"
            ) from None
        if not isinstance(data, dict):
            raise UsageError(f"--config {config_file}: expected a JSON object")
        cfg = model_config_from_dict(data, cfg)
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=layers)
    cfg.validate()
    check_output_dir(out_dir)
    start = time.perf_counter()
    try:
        with progress("items", enabled=not json_out) as bar:
            task = bar.add_task("writing tensors", total=None)
            path = write_random_checkpoint(
                out_dir,
                cfg,
                seed=seed_value,
                force=force,
                on_tensor=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except OSError as exc:  # one line naming the output, never the temporary name
        reason = exc.strerror or type(exc).__name__
        if exc.errno == errno.ENOSPC:
            raise MissingResourceError(f"{out_dir}: no space left on device") from None
        raise MissingResourceError(
            f"{out_dir}: cannot write the checkpoint there ({reason})"
        ) from None
    index = CheckpointIndex.open(path)
    result = {
        "checkpoint": str(path),
        "preset": preset_name,
        "config": str(config_file) if config_file is not None else None,
        "tensors": len(index),
        "bytes": index.file_bytes,
        "parameters": cfg.param_count(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if json_out:
        emit_json(result)
    else:
        out.print(
            f"wrote {result['tensors']} tensors ({human_bytes(index.file_bytes)}, "
            f"{cfg.param_count() / 1e6:.1f} M parameters) to {path}",
            markup=False,
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("random-checkpoint")(random_checkpoint)
