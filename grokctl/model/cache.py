"""The KV cache pytree.

Shapes: L layers, B batch, S cache length, G kv heads, K key_size.
One array per layer (not a stacked [L, ...] array) so that each layer's write is an in-place
`dynamic_update_slice` on a donated buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from grokctl.config import ModelConfig


@dataclasses.dataclass
class KVCache:
    # Arrays, or ShapeDtypeStructs / shardings when the pytree describes a cache.
    k: tuple[Any, ...]  # L x [B, S, G, K] bf16
    v: tuple[Any, ...]  # L x [B, S, G, K] bf16
    pos: Any  # [B] int32: tokens already written (next write offset)
    valid: Any  # [B, S] bool: a real (non-pad) token sits at that position

    @property
    def batch(self) -> int:
        return int(self.pos.shape[0])

    @property
    def length(self) -> int:
        return int(self.valid.shape[1])


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "pos", "valid"], meta_fields=[])


def cache_shapes(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """The cache as ShapeDtypeStructs (for eval_shape, memory plans and shardings)."""
    kv = jax.ShapeDtypeStruct((batch, length, cfg.num_kv_heads, cfg.key_size), jnp.bfloat16)
    return KVCache(
        k=(kv,) * cfg.num_layers,
        v=(kv,) * cfg.num_layers,
        pos=jax.ShapeDtypeStruct((batch,), jnp.int32),
        valid=jax.ShapeDtypeStruct((batch, length), jnp.bool_),
    )
