"""Built-in knowledge of the released file layout: every tensor file's exact size.

The byte size of a tensor pickle depends only on the parameter's shape and dtype (the pickle
header around the raw array bytes), so it is computed, not tabulated: the release pickler
(`checkpoint.xai.writer._ReleasePickler`) is run over stand-ins that carry the shape and dtype and
account for the array payload by length, so no tensor memory is touched. For the `grok-1`
preset this yields the 770 files of the release (318,239,886,140 bytes in all); the numbers of
the release are pinned below and checked by the tests.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from grokctl.checkpoint.layout import ParamSpec, param_specs
from grokctl.checkpoint.xai.files import CKPT_SUBDIR, tensor_filename
from grokctl.checkpoint.xai.writer import ReleaseQuantWeight, _ReleasePickler
from grokctl.config import ModelConfig

# The release, as published (xai-org/grok-1, ckpt-0/).
GROK1_FILE_COUNT = 770
GROK1_TOTAL_BYTES = 318_239_886_140
GROK1_SIZES = {
    "embeddings": 3_221_225_637,
    "final_norm": 24_727,
    "moe/linear": 1_611_137_347,
    "moe/linear_v": 1_611_137_347,
    "moe/linear_1": 1_611_399_491,
    "attention/key": 6_293_814,
    "attention/value": 6_293_814,
    "attention/linear": 37_847_359,
    "attention/query": 37_761_334,
    "rms_norm": 24_727,
    "router": 196_770,
}

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
_FRAME_TARGET = pickle._Framer._FRAME_SIZE_TARGET  # type: ignore[attr-defined]


class _Payload:
    """The raw bytes of a large array, by length only."""

    def __init__(self, n: int):
        self.n = n


class _ArrayStandIn:
    """Pickles exactly like a C-ordered numpy array of `shape`/`dtype`, without its data."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        self.shape, self.dtype = shape, dtype

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        n = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        data: Any = bytes(n) if n < _FRAME_TARGET else _Payload(n)
        # Fresh tuples, as numpy builds them: a shared constant would be memoized once.
        args = (np.ndarray, tuple([0]), b"b")
        return (_RECONSTRUCT, args, (1, tuple(self.shape), self.dtype, False, data))


class _SizingPickler(_ReleasePickler):
    """The release pickler; a large payload writes its opcode header and is counted, or with
    `holes` skipped over in the file (a sparse file of zeros)."""

    dispatch = dict(_ReleasePickler.dispatch)

    def __init__(self, file: BinaryIO, holes: bool = False):
        super().__init__(file, protocol=4)
        self.payload_bytes = 0
        self.file, self.holes = file, holes

    def save_payload(self, obj: _Payload) -> None:
        header = (
            pickle.BINBYTES8 + struct.pack("<Q", obj.n)
            if obj.n > 0xFFFFFFFF
            else pickle.BINBYTES + struct.pack("<I", obj.n)
        )
        self._write_large_bytes(header, b"")  # type: ignore[attr-defined]
        if self.holes:
            self.file.seek(obj.n, os.SEEK_CUR)
        self.payload_bytes += obj.n
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[_Payload] = save_payload  # type: ignore[assignment]


def _stand_in(spec: ParamSpec) -> Any:
    if spec.quantized:
        import ml_dtypes

        return ReleaseQuantWeight(
            _ArrayStandIn(spec.shape, np.dtype(np.int8)),  # type: ignore[arg-type]
            _ArrayStandIn(spec.scales_shape, np.dtype(ml_dtypes.bfloat16)),  # type: ignore[arg-type]
        )
    return _ArrayStandIn(spec.shape, np.dtype(spec.dtype))


@functools.lru_cache(maxsize=4096)
def tensor_file_size(spec: ParamSpec) -> int:
    """Exact size in bytes of the released pickle holding `spec`."""
    buf = io.BytesIO()
    pickler = _SizingPickler(buf)
    pickler.dump(_stand_in(spec))
    return len(buf.getvalue()) + pickler.payload_bytes


@functools.lru_cache(maxsize=16)
def expected_files(cfg: ModelConfig) -> dict[str, int]:
    """`ckpt-0/tensorNNNNN_000` -> exact size, in file order, for the model `cfg`."""
    return {
        f"{CKPT_SUBDIR}/{tensor_filename(i)}": tensor_file_size(spec)
        for i, spec in enumerate(param_specs(cfg))
    }


def expected_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """`ckpt-0/tensorNNNNN_000` -> the parameter it holds."""
    return {f"{CKPT_SUBDIR}/{tensor_filename(i)}": s for i, s in enumerate(param_specs(cfg))}


def write_sparse_checkpoint(root: str | os.PathLike[str], cfg: ModelConfig) -> Path:
    """The exact released files of `cfg` with all-zero arrays, written as sparse files: the full
    Grok-1 layout (318 GB apparent) in a few MB of disk, for testing `verify` at full size."""
    ckpt = Path(root) / CKPT_SUBDIR
    ckpt.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(param_specs(cfg)):
        with open(ckpt / tensor_filename(i), "wb") as fh:
            _SizingPickler(fh, holes=True).dump(_stand_in(spec))
    return Path(root)
