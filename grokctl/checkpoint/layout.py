"""The model's parameter layout, whatever the file format: every leaf's path, shape and quantization.

The order is the reference's: it saves one file per leaf of the flattened haiku parameter tree. Haiku params are
`{module_path: {param_name: leaf}}` and JAX flattens dicts in sorted key order, so the order
follows *string* order of module paths: `decoder_layer_10` sorts before `decoder_layer_2`. A
numeric mapping silently scrambles the real 64-layer checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from grokctl.config import ModelConfig

INT8 = "int8"
BF16 = "bfloat16"
F32 = "float32"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Expected form of one checkpoint leaf."""

    name: str  # full path, e.g. "transformer/decoder_layer_0/moe/linear/w"
    shape: tuple[int, ...]  # logical (dequantized) shape
    quantized: bool
    scale_blocks: int = 1  # G: row blocks of the int8 scales
    dtype: str = F32  # dtype of a plain array

    @property
    def module(self) -> str:
        return self.name.rsplit("/", 1)[0]

    @property
    def leaf(self) -> str:
        return self.name.rsplit("/", 1)[1]

    @property
    def scales_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-2], self.scale_blocks, self.shape[-1])

    @property
    def layer(self) -> int | None:
        parts = self.name.split("/")
        if len(parts) > 1 and parts[1].startswith("decoder_layer_"):
            return int(parts[1].removeprefix("decoder_layer_"))
        return None

    def nbytes(self) -> int:
        """Bytes of array data (int8 weight + bf16 scales, or the plain array)."""
        n = int(np.prod(self.shape, dtype=np.int64))
        if self.quantized:
            return n + 2 * int(np.prod(self.scales_shape, dtype=np.int64))
        return n * np.dtype(self.dtype).itemsize


def layer_specs(cfg: ModelConfig, i: int) -> list[ParamSpec]:
    d, f, e = cfg.emb_size, cfg.ffn_size, cfg.num_experts
    hk, gk = cfg.num_q_heads * cfg.key_size, cfg.num_kv_heads * cfg.key_size
    g = cfg.row_parallel_scale_blocks
    p = f"transformer/decoder_layer_{i}"
    return [
        ParamSpec(f"{p}/moe/linear/w", (e, d, f), True),
        ParamSpec(f"{p}/moe/linear_1/w", (e, f, d), True, g),
        ParamSpec(f"{p}/moe/linear_v/w", (e, d, f), True),
        ParamSpec(f"{p}/multi_head_attention/key/w", (d, gk), True),
        ParamSpec(f"{p}/multi_head_attention/linear/w", (hk, d), True, g),
        ParamSpec(f"{p}/multi_head_attention/query/w", (d, hk), True),
        ParamSpec(f"{p}/multi_head_attention/value/w", (d, gk), True),
        ParamSpec(f"{p}/rms_norm/scale", (d,), False),
        ParamSpec(f"{p}/rms_norm_1/scale", (d,), False),
        ParamSpec(f"{p}/rms_norm_2/scale", (d,), False),
        ParamSpec(f"{p}/rms_norm_3/scale", (d,), False),
        ParamSpec(f"{p}/router/w", (d, e), False),
    ]


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every checkpoint leaf, in file order (JAX's sorted-key flattening of the haiku tree)."""
    specs = [
        ParamSpec("language_model/in_out_embed/embeddings", (cfg.vocab_size, cfg.emb_size), False),
        ParamSpec("language_model/rms_norm/scale", (cfg.emb_size,), False),
    ]
    for i in range(cfg.num_layers):
        specs.extend(layer_specs(cfg, i))
    # Sort exactly as jax.tree_util sorts a {module: {param: leaf}} dict: module, then param.
    return sorted(specs, key=lambda s: (s.module, s.leaf))
