"""Format-neutral tensor references: where a tensor's raw bytes sit on disk.

Every checkpoint reader (the released pickles today) describes each parameter as an `ArrayRef`
(one array at a byte offset of a file) or a `QuantRef` (quantized weight + its scales); the
loader, `inspect` and `verify` work on these alone and never on a file format.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ArrayRef:
    """Where one array's raw bytes sit in a file."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool = False

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def memmap(self) -> np.ndarray:
        """Read-only memory map of the array (no copy)."""
        if self.nbytes == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(
            self.path,
            dtype=self.dtype,
            mode="r",
            offset=self.offset,
            shape=self.shape,
            order="F" if self.fortran_order else "C",
        )


@dataclasses.dataclass(frozen=True)
class QuantRef:
    """A quantized weight: stored `weight` [..., K*bits/8, N] and `scales` [..., G, N].

    bits=8 (the release's `QuantizedWeight8bit`): one int8 per value, `weight.shape` is the
    logical shape. bits<8 packs 8//bits values per byte along the contracting axis K (axis -2).
    """

    weight: ArrayRef
    scales: ArrayRef
    bits: int = 8

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape [..., K, N]."""
        w = self.weight.shape
        if self.bits == 8:
            return w
        return (*w[:-2], w[-2] * 8 // self.bits, w[-1])


TensorRef = ArrayRef | QuantRef
