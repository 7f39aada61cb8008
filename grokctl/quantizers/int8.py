"""Symmetric int8 quantization with one bf16 scale per column per block of rows, as released."""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

from grokctl.errors import UsageError


class Int8Weight(NamedTuple):
    weight: np.ndarray  # int8 [..., K, N]
    scales: np.ndarray  # bf16 [..., G, N]


def quantize_int8(w: np.ndarray, blocks: int = 1) -> Int8Weight:
    """Symmetric int8 with one bf16 scale per column per row block (G = `blocks`)."""
    *lead, k, n = w.shape
    if k % blocks:
        raise UsageError(f"{k} rows do not split into {blocks} scale blocks")
    wb = w.astype(np.float32).reshape(*lead, blocks, k // blocks, n)
    amax = np.abs(wb).max(axis=-2)  # [..., G, N]
    scales = (np.maximum(amax, 1e-12) / 127.0).astype(ml_dtypes.bfloat16)
    q = np.rint(wb / scales.astype(np.float32)[..., :, None, :])
    q = np.clip(q, -127, 127).astype(np.int8).reshape(w.shape)
    return Int8Weight(q, scales)


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
