"""Symmetric int4 quantization per group of rows along the contracting axis (-2), bf16 scales.

Shapes: w [..., K, N] (K contracting), G = K / group groups, scales [..., G, N] bf16,
packed [..., K/2, N] uint8 with row i holding the value of row 2i in its low nibble and row 2i+1
in its high nibble (two's-complement 4 bits; values in -7..7). The model's value of a weight is
bf16(q * scale): the int x bf16 product rounded to bf16 (int8 values are used exactly).

Scales carry `INT4_SCALE_BITS` (5) significant bits, so q * scale is itself a bf16 value for
every q (|q| <= 8 takes 3 bits more): the rounding never changes a weight, and the CPU kernels sum
x . q unscaled over a group and scale once, as for int8 (4-bit weights then stream at the memory
bandwidth, like 8-bit ones; a checkpoint with other scales still works, weight by weight).

Scale choice: round to nearest ("rtn") takes the smallest 5-bit value >= max|w| / 7 (no value
clipped). The clipping search tries every 5-bit value from there down to `MIN_CLIP_RATIO` of it
per group and keeps the one with the least squared reconstruction error (against the exact source
values); rtn is among them, so the search is never worse per group; `quantize_int4` reports
whether it changed anything (`method`: "clip-search" or "rtn").
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

from grokctl.checkpoint.native.format import INT4_SCALE_BITS
from grokctl.errors import UsageError
from grokctl.quantizers.int8 import dequantize_int8

QMAX = 7
MIN_CLIP_RATIO = 0.75
BF16 = np.dtype(ml_dtypes.bfloat16)


class Int4Weight(NamedTuple):
    packed: np.ndarray  # uint8 [..., K/2, N]
    scales: np.ndarray  # bf16 [..., K/group, N]
    method: str  # "clip-search" when any group's clipping ratio < 1 measured better, else "rtn"
    sq_error: float  # sum of squared reconstruction errors (f64)
    max_abs_error: float


def group_size_for(k: int, group: int) -> int:
    """Rows per int4 group for a contracting dimension K: `group` when it divides K (and is
    even), else the largest even divisor of K below it (the native format's `group_rows`: a
    packed byte never straddles two groups)."""
    from grokctl.checkpoint.native.format import group_rows

    if group < 2:
        raise UsageError(f"--group-size {group}: must be >= 2")
    rows = group_rows(k, group, 4)
    if not rows:
        raise UsageError(f"contracting dimension {k} has no even divisor up to {group}")
    return rows


def to_bf16_value(x: np.ndarray) -> np.ndarray:
    """f32 values rounded to bf16 (round-to-nearest-even), returned as f32."""
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def dequantize_blocks(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Exact model value of int weights [..., K, N] with block scales [..., G, N or 1]:
    bf16(q * scale) as f32 (the exact product, rounded). (Per-row int8 embeddings: scales [V, 1],
    G = V.)"""
    return to_bf16_value(dequantize_int8(q, scales))


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int values in -8..7, [..., K, N] (K even) -> uint8 [..., K/2, N]: even rows low nibble."""
    u = q.astype(np.int8).view(np.uint8) & 0x0F
    return (u[..., 0::2, :] | (u[..., 1::2, :] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., K/2, N] -> int8 [..., K, N] (sign-extended nibbles)."""
    p = packed.view(np.int8)
    lo = (p << 4).astype(np.int8) >> 4  # arithmetic shift sign-extends
    hi = p >> 4
    *lead, kh, n = packed.shape
    out = np.empty((*lead, kh, 2, n), np.int8)
    out[..., 0, :] = lo
    out[..., 1, :] = hi
    return out.reshape(*lead, 2 * kh, n)


def dequantize_int4(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Exact model value (f32) of a packed int4 weight."""
    return dequantize_blocks(unpack_int4(packed), scales)


_DROP = np.uint32(23 - (INT4_SCALE_BITS - 1))  # f32 mantissa bits below a scale's last one
_STEP = np.int64(1) << np.int64(_DROP)  # one step of the 5-bit grid, in f32 bits


def _unclipped(amax: np.ndarray) -> np.ndarray:
    """The scale [..., G, N] (f32) that clips nothing: max|w| / 7 (1e-12 / 7 for a zero group)."""
    return (np.maximum(amax, np.float32(1e-12)) / np.float32(QMAX)).astype(np.float32)


def _rtn_scales(lim: np.ndarray) -> np.ndarray:
    """f32 bits (int64) of the smallest 5-bit scale >= `lim` (f32 > 0)."""
    bits = lim.view(np.uint32).astype(np.int64)
    return (bits + (_STEP - 1)) & ~(_STEP - 1)


def _bf16(bits: np.ndarray) -> np.ndarray:
    """f32 bits on the 5-bit grid -> bf16 scales (exact: 5 significant bits fit bf16's 8)."""
    return bits.astype(np.uint32).view(np.float32).astype(BF16)


def _codes(wg: np.ndarray, scales: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """q = clip(round(w / scale), -7, 7) as f32 [..., G, g, N] (in `out` when given)."""
    out = np.divide(wg, scales.astype(np.float32)[..., :, None, :], out=out)
    np.rint(out, out=out)
    return np.clip(out, -QMAX, QMAX, out=out)


def _search_error(wg: np.ndarray, scales: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """Squared error per group [..., G, N] of q x scale (unrounded product: the search's
    measure; the reported errors are of the exact bf16 values). Works in place in `buf`."""
    _codes(wg, scales, buf)
    np.multiply(buf, scales.astype(np.float32)[..., :, None, :], out=buf)
    np.subtract(buf, wg, out=buf)
    np.square(buf, out=buf)
    return buf.sum(axis=-2, dtype=np.float32)


def quantize_int4(w: np.ndarray, group: int, clip_search: bool = True) -> Int4Weight:
    """Quantize f32 `w` [..., K, N] in groups of `group` rows (group divides K, even)."""
    *lead, k, n = w.shape
    if k % group or group % 2:
        raise UsageError(f"group size {group} must be even and divide {k}")
    w = np.asarray(w, np.float32)
    wg = w.reshape(*lead, k // group, group, n)
    amax = np.abs(wg).max(axis=-2)
    lim = _unclipped(amax)
    top = _rtn_scales(lim)
    candidates = [(_bf16(top), "rtn")]
    if clip_search:
        buf = np.empty_like(wg)
        floor = lim * np.float32(MIN_CLIP_RATIO)
        best_bits, best_err = top, _search_error(wg, candidates[0][0], buf)
        bits = top - _STEP  # one grid step down at a time (f32 bits: across binades too)
        while True:
            live = bits.astype(np.uint32).view(np.float32) >= floor
            if not live.any():
                break
            err = np.where(live, _search_error(wg, _bf16(np.where(live, bits, top)), buf), np.inf)
            better = err < best_err
            best_bits = np.where(better, bits, best_bits)
            best_err = np.minimum(err, best_err)
            bits = bits - _STEP
        candidates.append((_bf16(best_bits), "clip-search"))
    best: Int4Weight | None = None
    for scales, method in candidates:  # exact errors; the search is kept only if it is better
        q = _codes(wg, scales).astype(np.int8).reshape(w.shape)
        diff = dequantize_blocks(q, scales) - w
        sq = float(np.square(diff, dtype=np.float64).sum())
        if best is None or sq < best.sq_error:
            mx = float(np.abs(diff).max()) if diff.size else 0.0
            best = Int4Weight(pack_int4(q), scales, method, sq, mx)
    assert best is not None
    return best
