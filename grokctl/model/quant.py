"""Quantized weights as a pytree, and their dequantization inside jitted code.

Shapes: weight [..., K, N] int8 (or int4 packed two per byte: uint8 [..., K/2, N]), scales
[..., G, N] bf16 with G row blocks of K/G rows.
value = weight.reshape(..., G, K/G, N) * scales[..., :, None, :]

int8 values are exact (an int8 times a bf16 scale fits f32): grokctl computes x . (int8 x scale)
without rounding each weight to bf16 as the reference's `int8 * bf16` does — the golden
fixture's "exact dequantization, bf16 activations" variant (../shared/fixtures/grok-tiny), which
lets a kernel sum x . int8 and apply the scale once per group (docs/PERFORMANCE.md). int4 values
(the native int4 format) are nibble x scale rounded to bf16.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

BF16_BITS = jnp.uint16  # bf16 values held as their bit patterns (the KV cache, `bf16_tables`)


def to_bits(x: jax.Array) -> jax.Array:
    """bf16 values -> their uint16 bit patterns (free: a bitcast)."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)


def from_bits(x: jax.Array) -> jax.Array:
    """uint16 bit patterns -> the bf16 values (free: a bitcast)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16)


@jax.tree_util.register_pytree_node_class
class QuantizedWeight:
    """Quantized weight + bf16 group scales; `.shape` is the logical shape (haiku checks it).

    bits 8: `weight` int8 [..., K, N]. bits 4: `weight` uint8 [..., K/2, N], packed row i holding
    logical row 2i in its low nibble and row 2i+1 in its high nibble (two's complement), so it
    stays packed in device memory. `bits` is static (pytree aux data).
    """

    def __init__(self, weight: Any, scales: Any, bits: int = 8):
        self.weight = weight
        self.scales = scales
        self.bits = bits

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.weight.shape)
        if self.bits == 8:
            return shape
        return (*shape[:-2], shape[-2] * (8 // self.bits), shape[-1])

    @property
    def dtype(self) -> Any:
        return self.weight.dtype

    def tree_flatten(self) -> tuple[tuple[Any, Any], int]:
        return (self.weight, self.scales), self.bits

    @classmethod
    def tree_unflatten(cls, aux: int, children: tuple[Any, Any]) -> QuantizedWeight:
        return cls(*children, bits=aux)

    def __repr__(self) -> str:
        return f"QuantizedWeight(bits={self.bits}, weight={self.weight!r}, scales={self.scales!r})"


QuantizedWeight8bit = QuantizedWeight  # the release's name: the 8-bit case


def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 [..., K/2, N] -> int8 [..., K, N]: low nibble = row 2i, high nibble = row 2i+1,
    sign-extended with arithmetic shifts."""
    p = jax.lax.bitcast_convert_type(packed, jnp.int8)
    lo = jnp.right_shift(jnp.left_shift(p, 4), 4)  # [..., K/2, N]
    hi = jnp.right_shift(p, 4)
    *lead, kp, n = packed.shape
    return jnp.stack([lo, hi], axis=-2).reshape(*lead, kp * 2, n)


def int_values(w: QuantizedWeight) -> jax.Array:
    """The integer values [..., K, N] (int8) of a quantized weight."""
    return unpack_int4(w.weight) if w.bits == 4 else w.weight


class ExpertSlice:
    """Expert `expert`'s [K, N] slice of an [E, K, N] quantized weight, not yet sliced: the CPU
    kernel reads it in place (an XLA dynamic slice would first copy the expert's bytes). Lives
    only inside traced code (`take_expert` under `cpu_kernels`)."""

    def __init__(self, full: QuantizedWeight, expert: jax.Array):
        self.full = full
        self.expert = expert

    @property
    def shape(self) -> tuple[int, ...]:
        return self.full.shape[1:]  # logical [K, N] (int4: twice the packed rows)

    def sliced(self) -> QuantizedWeight:
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, self.expert, axis=0, keepdims=False)  # noqa: E731
        return QuantizedWeight(pick(self.full.weight), pick(self.full.scales), bits=self.full.bits)


def dequantize(w: Any, dtype: Any = jnp.float32) -> jax.Array:
    """Value of a (slice of a) quantized weight in `dtype` (f32: exact for int8; int4 values are
    bf16-rounded); plain arrays are cast."""
    if isinstance(w, ExpertSlice):
        w = w.sliced()
    if not isinstance(w, QuantizedWeight):
        return jnp.asarray(w).astype(dtype)
    weight, scales = int_values(w), w.scales
    *lead, k, n = weight.shape
    g = scales.shape[-2]
    work = jnp.float32 if w.bits == 8 else jnp.bfloat16  # int4: rounded to bf16
    blocks = weight.reshape(*lead, g, k // g, n).astype(work)  # [..., G, K/G, N]
    value = blocks * scales.astype(work)[..., :, None, :]
    return value.reshape(*lead, k, n).astype(dtype)


def qeinsum(spec: str, x: jax.Array, w: Any) -> jax.Array:
    """einsum(spec, x, dequantize(w)) with f32 accumulation -> f32, for a quantized weight
    [(E,) K, N] whose output ends in [..., N] after any expert axis. int8 with one scale group:
    the integer product in x's dtype (int8 values are exact in bf16), times the scales after
    (exact dequantization, no weight-sized multiply). int8 with several groups and bf16 x: the
    exact value (up to 15 significant bits) is hi + lo, two bf16 values, so x @ hi + x @ lo is
    exact products with f32 sums in two bf16 dots (3x faster than one f32 dot on the development
    CPU, and tensor-core dots on GPUs, where an f32 dot may run as TF32). Otherwise the exact
    values in f32."""
    if isinstance(w, QuantizedWeight) and w.bits == 8 and w.scales.shape[-2] == 1:
        y = jnp.einsum(spec, x, w.weight.astype(x.dtype), preferred_element_type=jnp.float32)
        s = w.scales.astype(jnp.float32)
        return y * (s[0] if s.ndim == 2 else s)  # [N], or [E, 1, N] against [E, ..., N]
    if isinstance(w, QuantizedWeight) and w.bits == 8 and x.dtype == jnp.bfloat16:
        v = dequantize(w)
        hi = v.astype(jnp.bfloat16)
        lo = (v - hi.astype(jnp.float32)).astype(jnp.bfloat16)  # exact: the remaining <= 8 bits
        dot = lambda b: jnp.einsum(spec, x, b, preferred_element_type=jnp.float32)  # noqa: E731
        return dot(hi) + dot(lo)
    wd = dequantize(w)
    if not (isinstance(w, QuantizedWeight) and w.bits == 8):
        wd = wd.astype(x.dtype)  # int4: bf16 values, exact in x's dtype
    return jnp.einsum(
        spec,
        x if wd.dtype == x.dtype else x.astype(wd.dtype),
        wd,
        preferred_element_type=jnp.float32,
    )


def take_expert(w: Any, e: jax.Array) -> Any:
    """Expert `e`'s slice of an [E, K, N] (quantized) weight: reads only that expert's bytes."""
    if isinstance(w, QuantizedWeight) and _kernel_operand(w) and kernels_active():
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
# Rows up to which the native kernels are used: a decode step up to batch 64 (and prompts that
# short). Beyond it XLA's dequantize-then-dot does as well on these CPUs (batch 128 ran as fast
# as 64), so longer prefills keep it (docs/PERFORMANCE.md, "Batched decode").
KERNEL_MAX_M = 64
# Rows of one expert's block in the sorted MoE dispatch (prefill; decode steps take
# `qmatmul_rows`) up to which the kernel runs it: from 32-row blocks (prompts of 65-128 tokens)
# XLA's dot is 2x faster in the whole prefill (docs/PERFORMANCE.md, "Batched decode").
BLOCK_KERNEL_MAX_M = 16
# The same for int4: its kernel's exact path (quantize's 5-bit scales) costs a third of int8's
# per weight, and 32-row blocks beat XLA's split dots (pp96 +30-40 %, pp128 +30 %; 64-row blocks
# lost at pp256; old int4 checkpoints: neutral) — docs/PERFORMANCE.md, "int4 at the memory
# bandwidth".
BLOCK_KERNEL_MAX_M4 = 32
# On a CPU with AMX tiles, int8 products of many rows run on them (q8_block_amx) faster than XLA's
# dot at every prompt length measured: a prompt's MoE layer is one rows call per matrix up to
# AMX_ROWS_KERNEL_MAX assignments (1,024 tokens with top-2; its gathered rows and outputs are the
# kernel's working space), and longer prompts' sorted blocks (`block_size` caps them at 512 rows)
# all take the kernel (docs/PERFORMANCE.md, "AMX prefill (stop 18)").
AMX_ROWS_KERNEL_MAX = 2048
AMX_BLOCK_KERNEL_MAX_M = 512
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


def kernels_active() -> bool:
    """At trace time: this program runs on one CPU device (the engine's `chunked_qmatmul(True)`
    context) and the native kernels are available (built, loaded, not disabled by
    GROKCTL_CPU_KERNELS=0)."""
    if not _chunked.get():
        return False
    from grokctl import kernels

    return kernels.available()


def _amx_int8(*weights: Any) -> bool:
    """At trace time: every weight is int8 and the kernels run on AMX tiles here (kernels_active
    is the caller's to check)."""
    from grokctl import kernels

    bits = [w.full.bits if isinstance(w, ExpertSlice) else getattr(w, "bits", 0) for w in weights]
    return all(b == 8 for b in bits) and kernels.info().get("isa") == "amx"


def _kernel_x(x: jax.Array) -> jax.Array:
    """Activations as the kernels take them: f32 as given, anything else as bf16."""
    return x if x.dtype == jnp.float32 else x.astype(jnp.bfloat16)


def cpu_kernels_enabled(single_device_cpu: bool) -> bool:
    """Whether an engine on a single CPU device will run the native kernels."""
    if not single_device_cpu:
        return False
    from grokctl import kernels

    return kernels.available()


def qmatmul_many(x: jax.Array, weights: list[Any]) -> list[jax.Array]:
    """[qmatmul(x, w) for w in weights]; three 2-D quantized weights of the same x (attention's
    query, key, value) run as one native kernel call when the kernels apply (decode)."""
    m = math.prod(x.shape[:-1])
    ok = (
        len(weights) == 3
        and m <= KERNEL_MAX_M
        and all(isinstance(w, QuantizedWeight) and w.weight.ndim == 2 for w in weights)
        and all(_kernel_operand(w) for w in weights)
        and kernels_active()
    )
    if not ok:
        return [qmatmul(x, w) for w in weights]
    from grokctl import kernels

    xf = _kernel_x(x)
    ys = kernels.qmatmul3(xf.reshape(-1, xf.shape[-1]), *((w.weight, w.scales) for w in weights))
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


# Assignments (tokens x chosen experts) up to which a sparse MoE step runs as rows of one native
# kernel call per matrix (`qmatmul_rows`): decode steps up to KERNEL_MAX_M tokens with top-2.
ROWS_KERNEL_MAX = 2 * KERNEL_MAX_M


def rows_kernel_ok(rows: int, *weights: Any) -> bool:
    """Whether `rows` assignments over these [E, K, N] quantized weights take `qmatmul_rows`."""
    ok = all(isinstance(w, QuantizedWeight) and _kernel_operand(w) for w in weights)
    if not (ok and kernels_active()):
        return False
    return rows <= (AMX_ROWS_KERNEL_MAX if _amx_int8(*weights) else ROWS_KERNEL_MAX)


def qmatmul_rows(x: jax.Array, w: QuantizedWeight, experts: jax.Array) -> jax.Array:
    """Row a of x [A, K] @ dequantize(w[experts[a]]) -> f32 [A, N] (the native kernel; rows
    choosing the same expert share one pass over its weights). Same rounding points and per-row
    sums as `qmatmul` on that expert."""
    from grokctl import kernels

    xf = _kernel_x(x)
    return kernels.qmatmul_rows(xf, w.weight, w.scales, experts)


def qmatmul_rows2(
    x: jax.Array, w: QuantizedWeight, v: QuantizedWeight, experts: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(`qmatmul_rows`(x, w), `qmatmul_rows`(x, v)) in one kernel call: the same values."""
    from grokctl import kernels

    xf = _kernel_x(x)
    return kernels.qmatmul_rows2(xf, (w.weight, w.scales), (v.weight, v.scales), experts)


def unembed(h: jax.Array, table: Any) -> jax.Array:
    """Logits h [..., D] . table[V, D]^T with bf16 operands and f32 accumulation -> bf16
    [..., V] (the reference's bf16 matmul of the tied embedding); an int8-per-row table
    (QuantizedWeight, native checkpoints) gives (h . W^T) * scales^T. With the native kernels and
    a bf16 or int8 table, one pass over the table for any number of rows (the kernels block the
    rows, and XLA's dot would first convert the whole table); otherwise XLA's dot."""
    hb = h.astype(jnp.bfloat16)
    if isinstance(table, QuantizedWeight):  # int8 per row [V, D] + scales [V, 1]: (h . W^T) * s^T
        if kernels_active():
            from grokctl import kernels

            acc = kernels.matmul_nt_int8(hb.reshape(-1, hb.shape[-1]), table.weight)
            acc = acc.reshape(*h.shape[:-1], table.weight.shape[0])
        else:
            acc = qmatmul(hb, table.weight.T)  # f32 [..., V]
        return (acc * table.scales[:, 0].astype(jnp.float32)).astype(jnp.bfloat16)
    if table.dtype in (jnp.bfloat16, BF16_BITS) and kernels_active():  # the kernel reads bits
        from grokctl import kernels

        y = kernels.matmul_nt_bf16(hb.reshape(-1, hb.shape[-1]), table)
        return y.reshape(*h.shape[:-1], table.shape[0]).astype(jnp.bfloat16)
    if table.dtype == BF16_BITS:  # `bf16_tables` without the kernels: XLA's dot on the values
        table = from_bits(table)
    return qmatmul(hb, table.T).astype(jnp.bfloat16)


EMBEDDINGS = ("language_model/in_out_embed", "embeddings")


def bf16_tables(params: Any) -> Any:
    """Params with the embedding table held in bf16, as its bit patterns (uint16, `BF16_BITS`):
    exact, as every use of it (the lookup and the logits) rounds it to bf16 first; halves the
    bytes the logits stream per token. Bits, as the KV cache: XLA:CPU widens a bf16 gather's
    operand to f32, and a loop around the decode step (`Engine.decode_steps`) hoists that
    conversion of the whole table out of the loop, to run once per call (512 MB written for
    bench-l2's table: steps 3x slower); a uint16 gather is a plain copy of the rows."""
    scope, name = EMBEDDINGS
    if not isinstance(params, dict) or scope not in params or name not in params[scope]:
        return params
    table = params[scope][name]
    if isinstance(table, QuantizedWeight) or table.dtype == BF16_BITS:
        return params  # an int8-per-row table (native format) or bits already
    cast = jax.jit(to_bits, out_shardings=table.sharding)
    out = dict(params)
    out[scope] = {**params[scope], name: cast(table)}
    return out


def _chunk_rows(rows_per_block: int, bits: int = 8) -> int:
    for c in range(min(CHUNK_ROWS, rows_per_block), 31, -1):
        if rows_per_block % c == 0 and (bits == 8 or c % 2 == 0):
            return c
    even = bits == 8 or rows_per_block % 2 == 0
    return rows_per_block if rows_per_block <= 1024 and even else 0


def _kernel_operand(w: Any) -> bool:
    """The native kernels take int8 weights and int4 ones whose scale groups hold whole row
    pairs (an expert slice or a whole matrix); plain arrays take the XLA paths."""
    if isinstance(w, ExpertSlice):
        return True
    if not isinstance(w, QuantizedWeight):
        return False
    if w.bits == 8:
        return True
    k, g = w.shape[-2], w.scales.shape[-2]
    return w.bits == 4 and (k // g) % 2 == 0


def _int4_split_dot(xf: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x @ dequantize(int4 w) without interleaving the nibbles back into rows: packed row i holds
    rows 2i (low nibble) and 2i+1 (high), so the product is x[..., 0::2] @ low + x[..., 1::2] @
    high — two half-size dots of the same bf16-rounded values (a different f32 summation order
    only). Materialising the interleaved [K, N] weight made int4 prefill 4x slower than int8."""
    p = jax.lax.bitcast_convert_type(w.weight, jnp.int8)  # [K/2, N]
    kp, n = p.shape
    g = w.scales.shape[-2]
    s = w.scales.astype(jnp.bfloat16)[:, None, :]  # [G, 1, N]: a group holds whole row pairs

    def values(nib: jax.Array) -> jax.Array:  # int8 [K/2, N] -> bf16-rounded, in x's dtype
        v = nib.reshape(g, kp // g, n).astype(jnp.bfloat16) * s
        return v.reshape(kp, n).astype(xf.dtype)

    lo = jnp.right_shift(jnp.left_shift(p, 4), 4)
    hi = jnp.right_shift(p, 4)
    dot = lambda a, b: jnp.einsum("...k,kn->...n", a, b, preferred_element_type=jnp.float32)  # noqa: E731
    return dot(xf[..., 0::2], values(lo)) + dot(xf[..., 1::2], values(hi))


def qmatmul(x: jax.Array, w: Any) -> jax.Array:
    """x [..., K] @ dequantize(w) [K, N] with f32 accumulation -> f32 [..., N].

    Exact int8 values (see the module docstring), int4 values rounded to bf16, and x as given
    (bf16 activations, or f32 for the expert output projection).
    """
    xf = _kernel_x(x)
    m = math.prod(x.shape[:-1])
    top = KERNEL_MAX_M
    if isinstance(w, ExpertSlice):
        top = BLOCK_KERNEL_MAX_M4 if w.full.bits == 4 else BLOCK_KERNEL_MAX_M
        top = AMX_BLOCK_KERNEL_MAX_M if _amx_int8(w) else top
    if _kernel_operand(w) and m <= top and kernels_active():
        from grokctl import kernels

        full, e = (w.full, w.expert) if isinstance(w, ExpertSlice) else (w, 0)
        call = kernels.qmatmul4 if full.bits == 4 else kernels.qmatmul
        y = call(xf.reshape(-1, xf.shape[-1]), full.weight, full.scales, e)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    if isinstance(w, ExpertSlice):
        w = w.sliced()
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum(
            "...k,kn->...n", xf, w.astype(xf.dtype), preferred_element_type=jnp.float32
        )
    k, n = w.shape
    g = w.scales.shape[-2]
    c = _chunk_rows(k // g, w.bits) if (_chunked.get() and m <= SMALL_M) else 0
    if not c and w.bits == 4 and (k // g) % 2 == 0:
        return _int4_split_dot(xf, w)
    if not c:
        return qeinsum("...k,kn->...n", xf, w)
    steps = k // c
    w_chunks = w.weight.reshape(steps, c * w.bits // 8, n)  # [C, c, N] (int4: [C, c/2, N])
    s_chunks = jnp.repeat(w.scales.astype(jnp.bfloat16), steps // g, axis=0)  # [C, N]
    x_chunks = jnp.moveaxis(xf.astype(jnp.float32).reshape(m, steps, c), 1, 0)  # [C, M, c]

    def step(acc: jax.Array, inp: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        wc, sc, xc = inp
        wd = (unpack_int4(wc) if w.bits == 4 else wc).astype(jnp.float32) * sc.astype(jnp.float32)[
            None, :
        ]
        if w.bits == 4:  # nibble x bf16 scale rounded to bf16, explicitly: XLA may elide a bf16
            # round trip (excess precision) but never a reduce_precision. int8: exact.
            wd = jax.lax.reduce_precision(wd, exponent_bits=8, mantissa_bits=7)
        return acc + jnp.dot(xc, wd, preferred_element_type=jnp.float32), None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32), (w_chunks, s_chunks, x_chunks))
    return acc.reshape(*x.shape[:-1], n)
