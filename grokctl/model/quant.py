"""Quantized weights as a pytree, and their dequantization inside jitted code.

Shapes: weight [..., K, N] int8, scales [..., G, N] bf16 with G row blocks of K/G rows.
value = weight.reshape(..., G, K/G, N) * scales[..., :, None, :]   (rounded to bf16, as the
reference computes `int8 * bf16`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class QuantizedWeight8bit:
    """int8 weight + bf16 block scales; `.shape` is the logical shape (haiku checks it)."""

    def __init__(self, weight: Any, scales: Any):
        self.weight = weight
        self.scales = scales

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> Any:
        return self.weight.dtype

    def tree_flatten(self) -> tuple[tuple[Any, Any], None]:
        return (self.weight, self.scales), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[Any, Any]) -> QuantizedWeight8bit:
        return cls(*children)

    def __repr__(self) -> str:
        return f"QuantizedWeight8bit(weight={self.weight!r}, scales={self.scales!r})"


def dequantize(w: Any, dtype: Any = jnp.bfloat16) -> jax.Array:
    """Full-precision value of a (slice of a) quantized weight; plain arrays are cast."""
    if not isinstance(w, QuantizedWeight8bit):
        return jnp.asarray(w).astype(dtype)
    weight, scales = w.weight, w.scales
    *lead, k, n = weight.shape
    g = scales.shape[-2]
    blocks = weight.reshape(*lead, g, k // g, n).astype(dtype)  # [..., G, K/G, N]
    value = blocks * scales.astype(dtype)[..., :, None, :]
    return value.reshape(*lead, k, n)


def take_expert(w: Any, e: jax.Array) -> Any:
    """Expert `e`'s slice of an [E, K, N] (quantized) weight: reads only that expert's bytes."""
    pick = lambda a: jax.lax.dynamic_index_in_dim(a, e, axis=0, keepdims=False)  # noqa: E731
    return jax.tree_util.tree_map(pick, w)
