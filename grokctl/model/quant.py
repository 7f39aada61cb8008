"""Quantized weights as a pytree, and their dequantization inside jitted code.

Shapes: weight [..., K, N] int8, scales [..., G, N] bf16 with G row blocks of K/G rows.
value = weight.reshape(..., G, K/G, N) * scales[..., :, None, :]   (rounded to bf16, as the
reference computes `int8 * bf16`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
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


class ExpertSlice:
    """Expert `expert`'s [K, N] slice of an [E, K, N] quantized weight, not yet sliced: the CPU
    kernel reads it in place (an XLA dynamic slice would first copy the expert's bytes). Lives
    only inside traced code (`take_expert` under `cpu_kernels`)."""

    def __init__(self, full: QuantizedWeight8bit, expert: jax.Array):
        self.full = full
        self.expert = expert

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.full.weight.shape[1:])

    def sliced(self) -> QuantizedWeight8bit:
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, self.expert, axis=0, keepdims=False)  # noqa: E731
        return QuantizedWeight8bit(pick(self.full.weight), pick(self.full.scales))


def dequantize(w: Any, dtype: Any = jnp.bfloat16) -> jax.Array:
    """Full-precision value of a (slice of a) quantized weight; plain arrays are cast."""
    if isinstance(w, ExpertSlice):
        w = w.sliced()
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
    if isinstance(w, QuantizedWeight8bit) and _use_kernels():
        return ExpertSlice(w, e)
    pick = lambda a: jax.lax.dynamic_index_in_dim(a, e, axis=0, keepdims=False)  # noqa: E731
    return jax.tree_util.tree_map(pick, w)


# --- int8 matmul -------------------------------------------------------------------------------
# XLA:CPU does not fuse the int8 -> bf16 dequantize into a dot: it materialises the whole
# full-precision weight for every call. For the few rows of a decode step, dequantizing
# `CHUNK_ROWS` rows at a time inside a scan keeps the converted slice in cache (1.6x faster per
# matmul, docs/PERFORMANCE.md). Enabled by the engine on single-device CPU runs only: on a mesh the
# scan would have to gather a row-sharded weight, and GPUs read HBM fast enough without it.
SMALL_M = 16
# Rows up to which the native kernel is used (decode). Beyond it XLA's dequantize-then-dot wins
# on the development CPU (docs/PERFORMANCE.md, benchmarks/qmatmul_bench.py), so prefill keeps it.
KERNEL_MAX_M = 8
CHUNK_ROWS = 128
_chunked = contextvars.ContextVar("grokctl_chunked_qmatmul", default=False)


@contextlib.contextmanager
def chunked_qmatmul(enabled: bool) -> Iterator[None]:
    """Within this context (at trace time), int8 matmuls on single-device CPU use the native
    kernel (grokctl.kernels) when it is available, else small-M ones use the chunked scan."""
    token = _chunked.set(enabled)
    try:
        yield
    finally:
        _chunked.reset(token)


def _use_kernels() -> bool:
    """Single-device CPU trace (`chunked_qmatmul(True)`) and the native kernels are available
    (built, loaded, not disabled by GROKCTL_CPU_KERNELS=0)."""
    if not _chunked.get():
        return False
    from grokctl import kernels

    return kernels.available()


def cpu_kernels_enabled(single_device_cpu: bool) -> bool:
    """Whether an engine on a single CPU device will run the native kernels."""
    if not single_device_cpu:
        return False
    from grokctl import kernels

    return kernels.available()


def unembed(h: jax.Array, table: Any) -> jax.Array:
    """Logits h [..., D] . table[V, D]^T with bf16 operands and f32 accumulation -> bf16
    [..., V] (the reference's bf16 matmul of the tied embedding). With the native kernels and a
    bf16 table (`bf16_tables`), one pass over the table; otherwise XLA's dot."""
    hb = h.astype(jnp.bfloat16)
    m = math.prod(h.shape[:-1])
    if table.dtype == jnp.bfloat16 and m <= KERNEL_MAX_M and _use_kernels():
        from grokctl import kernels

        y = kernels.matmul_nt_bf16(hb.reshape(-1, hb.shape[-1]), table)
        return y.reshape(*h.shape[:-1], table.shape[0]).astype(jnp.bfloat16)
    return qmatmul(hb, table.T).astype(jnp.bfloat16)


EMBEDDINGS = ("language_model/in_out_embed", "embeddings")


def bf16_tables(params: Any) -> Any:
    """Params with the embedding table held in bf16: exact, as every use of it (the lookup and
    the logits) rounds it to bf16 first; halves the bytes the logits stream per token."""
    scope, name = EMBEDDINGS
    if not isinstance(params, dict) or scope not in params or name not in params[scope]:
        return params
    table = params[scope][name]
    if table.dtype == jnp.bfloat16:
        return params
    cast = jax.jit(lambda a: a.astype(jnp.bfloat16), out_shardings=table.sharding)
    out = dict(params)
    out[scope] = {**params[scope], name: cast(table)}
    return out


def _chunk_rows(rows_per_block: int) -> int:
    for c in range(min(CHUNK_ROWS, rows_per_block), 31, -1):
        if rows_per_block % c == 0:
            return c
    return rows_per_block if rows_per_block <= 1024 else 0


def qmatmul(x: jax.Array, w: Any) -> jax.Array:
    """x [..., K] @ dequantize(w) [K, N] with f32 accumulation -> f32 [..., N].

    The product uses the reference's rounding points: int8 x bf16 scale rounded to bf16, and x
    as given (bf16 activations, or f32 for the expert output projection).
    """
    xf = x if x.dtype == jnp.float32 else x.astype(jnp.bfloat16)
    m = math.prod(x.shape[:-1])
    if isinstance(w, ExpertSlice | QuantizedWeight8bit) and m <= KERNEL_MAX_M and _use_kernels():
        from grokctl import kernels

        full, e = (w.full, w.expert) if isinstance(w, ExpertSlice) else (w, 0)
        y = kernels.qmatmul(xf.reshape(-1, xf.shape[-1]), full.weight, full.scales, e)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    if isinstance(w, ExpertSlice):
        w = w.sliced()
    if not isinstance(w, QuantizedWeight8bit):
        return jnp.einsum(
            "...k,kn->...n", xf, w.astype(xf.dtype), preferred_element_type=jnp.float32
        )
    k, n = w.weight.shape
    g = w.scales.shape[-2]
    c = _chunk_rows(k // g) if (_chunked.get() and m <= SMALL_M) else 0
    if not c:
        wd = dequantize(w).astype(xf.dtype)
        return jnp.einsum("...k,kn->...n", xf, wd, preferred_element_type=jnp.float32)
    steps = k // c
    w_chunks = w.weight.reshape(steps, c, n)  # [C, c, N]
    s_chunks = jnp.repeat(w.scales.astype(jnp.bfloat16), steps // g, axis=0)  # [C, N]
    x_chunks = jnp.moveaxis(xf.astype(jnp.float32).reshape(m, steps, c), 1, 0)  # [C, M, c]

    def step(acc: jax.Array, inp: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        wc, sc, xc = inp
        # int8 x bf16 scale rounded to bf16, explicitly: XLA may elide a bf16 round trip
        # (excess precision) but never a reduce_precision.
        wd = wc.astype(jnp.float32) * sc.astype(jnp.float32)[None, :]
        wd = jax.lax.reduce_precision(wd, exponent_bits=8, mantissa_bits=7)
        return acc + jnp.dot(xc, wd, preferred_element_type=jnp.float32), None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32), (w_chunks, s_chunks, x_chunks))
    return acc.reshape(*x.shape[:-1], n)
