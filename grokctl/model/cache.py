"""The KV cache pytree.

Shapes: L layers, B batch, G kv heads, S cache length, K key_size.
One array per layer (not a stacked [L, ...] array) so that each layer's write is an in-place
`dynamic_update_slice` on a donated buffer. Keys and values are bf16 values stored as their bit
patterns (uint16, `CACHE_DTYPE`): XLA:CPU has no bf16 scatter and converts a bf16 cache to f32
and back around every write (O(cache) per layer per step); the 16-bit integer write is in place.
Each kv head's positions are contiguous ([B, G, S, K]), so attention reads the cache in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from grokctl.config import ModelConfig
from grokctl.model.quant import BF16_BITS

CACHE_DTYPE = BF16_BITS  # bf16 bit patterns (quant.to_bits / from_bits)


@dataclasses.dataclass
class KVCache:
    # Arrays, or ShapeDtypeStructs / shardings when the pytree describes a cache.
    k: tuple[Any, ...]  # L x [B, G, S, K] uint16 (bf16 bits)
    v: tuple[Any, ...]  # L x [B, G, S, K] uint16 (bf16 bits)
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
    kv = jax.ShapeDtypeStruct((batch, cfg.num_kv_heads, length, cfg.key_size), CACHE_DTYPE)
    return KVCache(
        k=(kv,) * cfg.num_layers,
        v=(kv,) * cfg.num_layers,
        pos=jax.ShapeDtypeStruct((batch,), jnp.int32),
        valid=jax.ShapeDtypeStruct((batch, length), jnp.bool_),
    )
