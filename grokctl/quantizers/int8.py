"""Symmetric int8 quantization with one bf16 scale per column per block of rows, as released."""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

from grokctl.errors import UsageError


class Int8Weight(NamedTuple):
    weight: np.ndarray  # int8 [..., K, N]
    scales: np.ndarray  # bf16 [..., G, N]


def quantize_int8(w: np.ndarray, blocks: int = 1, overwrite: bool = False) -> Int8Weight:
    """Symmetric int8 with one bf16 scale per column per row block (G = `blocks`).
    `overwrite`: w (f32) may serve as the scratch space (its values are lost)."""
    *lead, k, n = w.shape
    if k % blocks:
        raise UsageError(f"{k} rows do not split into {blocks} scale blocks")
    # At most one temporary of w's size (the quotient, rounded and clipped in place): a
    # real-width expert matrix is 0.8 GB of f32, and each fresh one is paid again in page faults.
    wb = w.astype(np.float32, copy=False).reshape(*lead, blocks, k // blocks, n)
    amax = np.maximum(wb.max(axis=-2), -wb.min(axis=-2))  # max |w| per [..., G, N]
    scales = (np.maximum(amax, 1e-12) / 127.0).astype(ml_dtypes.bfloat16)
    q = np.divide(wb, scales.astype(np.float32)[..., :, None, :], out=wb if overwrite else None)
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)
    return Int8Weight(q.astype(np.int8).reshape(w.shape), scales)


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The model's value (f32) of int8 weights [..., K, N] with block scales [..., G, N] (or any
    int values: int4's `dequantize_blocks` rounds this): q x scale, exact (grokctl does not round
    int8 values to bf16: grokctl/model/quant.py)."""
    *lead, k, n = q.shape
    g = scales.shape[-2]
    v = (
        q.astype(np.float32).reshape(*lead, g, k // g, n)
        * scales.astype(np.float32)[..., :, None, :]
    )
    return v.reshape(q.shape)
