"""Where the release keeps each parameter: `ckpt-0/tensorNNNNN_000`, numbered in `param_specs`
order (JAX's sorted-key flattening of the haiku tree)."""

from __future__ import annotations

CKPT_SUBDIR = "ckpt-0"


def tensor_filename(index: int, shard: int = 0) -> str:
    return f"tensor{index:05d}_{shard:03d}"
