"""Checkpoint index: parameter path, shape, dtype, quantization, file and byte offset.

Built from the pickle headers alone (no tensor data read), so it takes seconds on the real
770-file checkpoint. `inspect`, `verify`, `quantize` and the loader all start here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from grokctl.checkpoint.layout import ParamSpec, param_specs, tensor_filename
from grokctl.checkpoint.safe_pickle import ArrayRef, QuantRef, TensorRef, parse_tensor_file
from grokctl.config import ModelConfig, load_model_config
from grokctl.errors import IntegrityError, MissingResourceError

CKPT_SUBDIR = "ckpt-0"


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    index: int
    spec: ParamSpec
    path: str
    ref: TensorRef
    file_bytes: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def quantized(self) -> bool:
        return isinstance(self.ref, QuantRef)

    @property
    def scale_blocks(self) -> int:
        return self.ref.scales.shape[-2] if isinstance(self.ref, QuantRef) else 0

    @property
    def dtype(self) -> str:
        ref = self.ref.weight if isinstance(self.ref, QuantRef) else self.ref
        return str(ref.dtype)

    def load(self) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Memory-mapped arrays (no copy): the array, or (int8 weight, bf16 scales)."""
        if isinstance(self.ref, QuantRef):
            return self.ref.weight.memmap(), self.ref.scales.memmap()
        return self.ref.memmap()


def find_ckpt_dir(checkpoint: str | os.PathLike[str]) -> Path:
    """Accept the download directory (holding ckpt-0/) or ckpt-0/ itself."""
    root = Path(checkpoint)
    if not root.exists():
        raise MissingResourceError(f"checkpoint directory not found: {root}")
    if (root / CKPT_SUBDIR).is_dir():
        return root / CKPT_SUBDIR
    if root.name == CKPT_SUBDIR or any(root.glob("tensor00000_*")):
        return root
    raise MissingResourceError(f"{root}: no {CKPT_SUBDIR}/ with tensor files found")


def checkpoint_root(checkpoint: str | os.PathLike[str]) -> Path:
    ckpt = find_ckpt_dir(checkpoint)
    return ckpt.parent if ckpt.name == CKPT_SUBDIR else ckpt


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


_check = check_entry


@dataclasses.dataclass
class CheckpointIndex:
    root: Path
    ckpt_dir: Path
    config: ModelConfig
    entries: list[IndexEntry]

    @classmethod
    def open(
        cls,
        checkpoint: str | os.PathLike[str],
        preset: str | None = None,
        config: ModelConfig | None = None,
        workers: int = 8,
    ) -> CheckpointIndex:
        ckpt = find_ckpt_dir(checkpoint)
        root = ckpt.parent if ckpt.name == CKPT_SUBDIR else ckpt
        cfg = config or load_model_config(root, preset)
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
        entries = []
        for i, (spec, path, ref) in enumerate(zip(specs, paths, refs)):
            _check(spec, ref, str(path))
            entries.append(IndexEntry(i, spec, str(path), ref, path.stat().st_size))
        return cls(root, ckpt, cfg, entries)

    def __iter__(self) -> Iterator[IndexEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def by_name(self) -> dict[str, IndexEntry]:
        return {e.name: e for e in self.entries}

    @property
    def file_bytes(self) -> int:
        return sum(e.file_bytes for e in self.entries)
