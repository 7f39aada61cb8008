"""Basic layers over haiku parameters with the reference's names (via name scopes).

Shapes: B batch, T time, D emb_size, N output features, V vocab.
"""

from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from grokctl.model.quant import qmatmul, qmatmul_many

BF16 = jnp.bfloat16
F32 = jnp.float32


def round_bf16(x: jax.Array) -> jax.Array:
    """f32 values rounded to the nearest bf16, kept f32 (`x.astype(BF16).astype(F32)` that XLA
    cannot elide: with excess precision allowed it may drop a convert pair, never this op)."""
    return jax.lax.reduce_precision(x.astype(F32), exponent_bits=8, mantissa_bits=7)


def bf16_dot(x: jax.Array, w: Any) -> jax.Array:
    """bf16 x dequantized weight (exact int8 values) with f32 accumulation, rounded to bf16 (the
    reference's matmul); `w` is a plain array or a QuantizedWeight8bit."""
    return qmatmul(x.astype(BF16), w).astype(BF16)


def param(name: str, shape: tuple[int, ...], dtype: Any = F32) -> Any:
    """A checkpoint leaf in the current name scope (the initializer only serves shape tracing)."""
    return hk.get_parameter(name, shape, dtype, init=hk.initializers.Constant(0))


def scoped_param(scope: str, name: str, shape: tuple[int, ...], dtype: Any = F32) -> Any:
    with hk.experimental.name_scope(scope):
        return param(name, shape, dtype)


def linear(x: jax.Array, scope: str, in_features: int, out_features: int) -> jax.Array:
    """`<scope>/w`: [K, N] int8 QuantizedWeight8bit (or plain float), no bias; [..., K] -> [..., N]."""
    return bf16_dot(x, scoped_param(scope, "w", (in_features, out_features)))


def linears(x: jax.Array, specs: list[tuple[str, int, int]]) -> list[jax.Array]:
    """Several `linear`s of the same x ((scope, in_features, out_features) each), computed
    together where the native kernels can (one call for attention's query/key/value)."""
    ws = [scoped_param(scope, "w", (k, n)) for scope, k, n in specs]
    return [y.astype(BF16) for y in qmatmul_many(x.astype(BF16), ws)]


def rms_norm(x: jax.Array, scope: str, eps: float) -> jax.Array:
    """`<scope>/scale` [D]: x * rsqrt(mean(x^2) + eps) * scale in f32, cast back (no +1)."""
    return rms_norm_apply(x, scoped_param(scope, "scale", (x.shape[-1],)), eps)


def rms_norm_apply(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(F32)
    ms = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    return (scale.astype(F32) * (xf * jax.lax.rsqrt(ms + eps))).astype(x.dtype)
