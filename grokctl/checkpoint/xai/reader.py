"""Index reader for the released format: find `ckpt-0/`, parse every tensor pickle's header,
check each against the model's layout. No tensor data is read (seconds for the 770 files)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from grokctl.checkpoint.layout import ParamSpec, param_specs
from grokctl.checkpoint.refs import ArrayRef, QuantRef, TensorRef
from grokctl.checkpoint.xai.files import CKPT_SUBDIR, tensor_filename
from grokctl.checkpoint.xai.safe_pickle import parse_tensor_file
from grokctl.config import ModelConfig
from grokctl.errors import IntegrityError

NAME = "xai"
WHAT = f"{CKPT_SUBDIR}/ with tensor files"  # what `detect` looks for, for the error message


def detect(path: Path) -> Path | None:
    """The checkpoint root when `path` (the download directory, or ckpt-0/ itself) holds the
    released format, else None."""
    if (path / CKPT_SUBDIR).is_dir():
        return path
    if path.name == CKPT_SUBDIR:
        return path.parent
    if any(path.glob("tensor00000_*")):
        return path
    return None


def check_entry(entry_spec: ParamSpec, ref: TensorRef, path: str) -> None:
    """Raise IntegrityError when a parsed tensor file does not hold what `entry_spec` says: its
    shapes, and exactly the release's dtypes (int8 weights with bf16 scales, float32 arrays).
    One judgement for every command (`inspect`, `verify`, `generate` all call this): another
    float dtype, say a float64 norm scale, is refused, never cast; the reader has already
    refused big-endian arrays."""
    if entry_spec.quantized:
        if not isinstance(ref, QuantRef):
            raise IntegrityError(f"{path}: {entry_spec.name} should be an int8 QuantizedWeight8bit")
        w, s = ref.weight, ref.scales
        if w.shape != entry_spec.shape or w.dtype != np.int8:
            raise IntegrityError(
                f"{path}: {entry_spec.name} weight is {w.dtype}{list(w.shape)}, "
                f"expected int8{list(entry_spec.shape)}"
            )
        g = s.shape[-2] if len(s.shape) >= 2 else 0
        if (
            len(s.shape) != len(w.shape)
            or s.shape[:-2] != w.shape[:-2]
            or s.shape[-1] != w.shape[-1]
            or g == 0
            or w.shape[-2] % g
        ):
            raise IntegrityError(
                f"{path}: {entry_spec.name} scales {list(s.shape)} do not fit weight {list(w.shape)}"
            )
        if s.dtype.name != "bfloat16":
            raise IntegrityError(
                f"{path}: {entry_spec.name} scales have dtype {s.dtype}, expected bfloat16"
            )
    else:
        if not isinstance(ref, ArrayRef):
            raise IntegrityError(f"{path}: {entry_spec.name} should be a plain array")
        if ref.shape != entry_spec.shape:
            raise IntegrityError(
                f"{path}: {entry_spec.name} has shape {list(ref.shape)}, expected {list(entry_spec.shape)}"
            )
        if ref.dtype != np.dtype(entry_spec.dtype):  # exactly the release's: never cast
            raise IntegrityError(
                f"{path}: {entry_spec.name} has dtype {ref.dtype}, expected {entry_spec.dtype}"
            )


def read(root: Path, cfg: ModelConfig, workers: int = 8) -> list[tuple[ParamSpec, Path, TensorRef]]:
    """(spec, file, ref) of every parameter in order; IntegrityError for a missing or bad file."""
    ckpt = root / CKPT_SUBDIR if (root / CKPT_SUBDIR).is_dir() else root
    specs = param_specs(cfg)
    paths = [ckpt / tensor_filename(i) for i in range(len(specs))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise IntegrityError(
            f"{ckpt}: {len(missing)} of {len(specs)} tensor files missing "
            f"({', '.join(missing[:3])}{more})"
        )
    with ThreadPoolExecutor(max_workers=workers) as pool:
        refs = list(pool.map(parse_tensor_file, paths))
    for spec, path, ref in zip(specs, paths, refs):
        check_entry(spec, ref, str(path))
    return list(zip(specs, paths, refs))
