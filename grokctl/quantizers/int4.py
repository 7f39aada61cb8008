"""Symmetric int4 quantization per group of rows along the contracting axis (-2), bf16 scales.

Shapes: w [..., K, N] (K contracting), G = K / group groups, scales [..., G, N] bf16,
packed [..., K/2, N] uint8 with row i holding the value of row 2i in its low nibble and row 2i+1
in its high nibble (two's-complement 4 bits; values in -7..7). The model's value of a weight is
bf16(q * scale): the int x bf16 product rounded to bf16, as the int8 path computes it.

Clipping search: for every group, each ratio of `CLIP_RATIOS` scales max|w| down before
choosing the scale; the ratio with the least squared reconstruction error (against the exact
source values) wins. Ratio 1.0 is plain round-to-nearest, so the search is never worse per
group; `quantize_int4` reports whether it changed anything (`method`: "clip-search" or "rtn").
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

from grokctl.errors import UsageError

QMAX = 7
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
BF16 = np.dtype(ml_dtypes.bfloat16)


class Int4Weight(NamedTuple):
    packed: np.ndarray  # uint8 [..., K/2, N]
    scales: np.ndarray  # bf16 [..., K/group, N]
    method: str  # "clip-search" when any group's clipping ratio < 1 measured better, else "rtn"
    sq_error: float  # sum of squared reconstruction errors (f64)
    max_abs_error: float


def group_size_for(k: int, group: int) -> int:
    """`group` when it divides K, else the largest divisor of K below it (>= 2 when K is even)."""
    if group < 2:
        raise UsageError(f"--group-size {group}: must be >= 2")
    if k % group == 0:
        return group
    for g in range(min(group - 1, k), 1, -1):
        if k % g == 0 and g % 2 == 0:
            return g
    raise UsageError(f"contracting dimension {k} has no even divisor below {group}")


def to_bf16_value(x: np.ndarray) -> np.ndarray:
    """f32 values rounded to bf16 (round-to-nearest-even), returned as f32."""
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def dequantize_blocks(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Exact model value of int weights [..., K, N] with block scales [..., G, N or 1]:
    bf16(q * scale) as f32. (Per-row int8 embeddings: scales [V, 1], G = V.)"""
    *lead, k, n = q.shape
    g = scales.shape[-2]
    qf = q.astype(np.float32).reshape(*lead, g, k // g, n)
    v = qf * scales.astype(np.float32)[..., :, None, :]
    return to_bf16_value(v).reshape(q.shape)


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


def _quantize_groups(wg: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """wg [..., G, g, N] f32 -> (q int8 [..., G, g, N], scales bf16 [..., G, N], sq err [..., G, N])."""
    amax = np.abs(wg).max(axis=-2) * np.float32(ratio)
    scales = (np.maximum(amax, np.float32(1e-12)) / np.float32(QMAX)).astype(BF16)
    sf = scales.astype(np.float32)[..., :, None, :]
    q = np.clip(np.rint(wg / sf), -QMAX, QMAX)
    err = ((to_bf16_value(q * sf) - wg) ** 2).sum(axis=-2, dtype=np.float32)
    return q.astype(np.int8), scales, err


def quantize_int4(w: np.ndarray, group: int, clip_search: bool = True) -> Int4Weight:
    """Quantize f32 `w` [..., K, N] in groups of `group` rows (group divides K, even)."""
    *lead, k, n = w.shape
    if k % group or group % 2:
        raise UsageError(f"group size {group} must be even and divide {k}")
    wg = np.asarray(w, np.float32).reshape(*lead, k // group, group, n)
    q, scales, err = _quantize_groups(wg, 1.0)
    rtn_total = float(err.sum(dtype=np.float64))
    method = "rtn"
    if clip_search:
        best_q, best_s, best_err = q, scales, err
        for ratio in CLIP_RATIOS[1:]:
            q2, s2, e2 = _quantize_groups(wg, ratio)
            better = e2 < best_err
            if better.any():
                best_q = np.where(better[..., :, None, :], q2, best_q)
                best_s = np.where(better, s2, best_s)
                best_err = np.minimum(e2, best_err)
        search_total = float(best_err.sum(dtype=np.float64))
        if search_total < rtn_total:  # keep the search only when it measures better
            q, scales, err, method = best_q, best_s, best_err, "clip-search"
    q = q.reshape(w.shape)
    rec = dequantize_blocks(q, scales)
    diff = rec - np.asarray(w, np.float32)
    return Int4Weight(
        pack_int4(q),
        scales,
        method,
        float(np.square(diff, dtype=np.float64).sum()),
        float(np.abs(diff).max()) if diff.size else 0.0,
    )
