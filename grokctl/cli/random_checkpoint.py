"""`grokctl random-checkpoint`: a random-weight checkpoint in the exact released format."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from grokctl.cli import options
from grokctl.cli.output import emit_json, human_bytes, info, progress


def random_checkpoint(
    out_dir: Annotated[
        Path, typer.Argument(help="Directory to create (ckpt-0/, config.json, tokenizer.model).")
    ],
    preset: Annotated[str, typer.Option("--preset", help="Architecture preset.")] = "grok-demo",
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Architecture as a config.json (its keys override the preset's).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    layers: Annotated[
        int | None, typer.Option("--layers", min=1, help="Override the preset's layer count.")
    ] = None,
    force: options.Force = False,
    json_out: options.Json = False,
) -> None:
    """Write a random-weight checkpoint of a preset: int8 weights with block scales, f32 norms,
    router and embeddings, config.json and a small SentencePiece tokenizer."""
    import dataclasses

    from grokctl.checkpoint.index import CheckpointIndex
    from grokctl.checkpoint.writer import write_random_checkpoint
    from grokctl.config import model_config_from_dict
    from grokctl.config import preset as get_preset
    from grokctl.errors import MissingResourceError, UsageError

    cfg = get_preset(preset)
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
    start = time.perf_counter()
    with progress("items", enabled=not json_out) as bar:
        task = bar.add_task("writing tensors", total=None)
        path = write_random_checkpoint(
            out_dir,
            cfg,
            seed=seed,
            force=force,
            on_tensor=lambda done, total: bar.update(task, completed=done, total=total),
        )
    index = CheckpointIndex.open(path)
    result = {
        "path": str(path),
        "preset": preset,
        "config": str(config_file) if config_file is not None else None,
        "tensors": len(index),
        "bytes": index.file_bytes,
        "parameters": cfg.param_count(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if json_out:
        emit_json(result)
    else:
        info(
            f"wrote {result['tensors']} tensors ({human_bytes(index.file_bytes)}, "
            f"{cfg.param_count() / 1e6:.1f} M parameters) to {path}"
        )


def register(app: typer.Typer) -> None:
    app.command("random-checkpoint")(random_checkpoint)
