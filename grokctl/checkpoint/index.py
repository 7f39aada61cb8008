"""Checkpoint index: parameter path, shape, dtype, quantization, file and byte offset.

Built from file headers alone (no tensor data read), so it takes seconds on the real 770-file
checkpoint. `inspect`, `verify`, `quantize` and the loader all start here. `CheckpointIndex.open`
asks each known format (`FORMATS`) whether it recognises the directory, and lets that format's
reader list the tensors as format-neutral references (`checkpoint.refs`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from grokctl.checkpoint import native
from grokctl.checkpoint.layout import ParamSpec
from grokctl.checkpoint.refs import QuantRef, TensorRef
from grokctl.checkpoint.xai import reader as xai_reader
from grokctl.config import ModelConfig, load_model_config
from grokctl.errors import MissingResourceError


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """One on-disk format: `detect(path)` -> the checkpoint root, or None when `path` is not in
    this format; `read(root, cfg, workers)` -> (spec, file, ref) per parameter, in order."""

    name: str
    what: str  # what `detect` looks for (named in the error when no format matches)
    detect: Callable[[Path], Path | None]
    read: Callable[[Path, ModelConfig, int], list[tuple[ParamSpec, Path, TensorRef]]]


FORMATS: list[CheckpointFormat] = [
    CheckpointFormat(xai_reader.NAME, xai_reader.WHAT, xai_reader.detect, xai_reader.read),
    CheckpointFormat(native.NAME, native.WHAT, native.detect, native.read),
]


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


def detect_format(checkpoint: str | os.PathLike[str]) -> tuple[CheckpointFormat, Path]:
    """The format of `checkpoint` and its root directory; MissingResourceError when none fits."""
    path = Path(checkpoint)
    if not path.exists():
        raise MissingResourceError(f"checkpoint directory not found: {path}")
    for fmt in FORMATS:
        root = fmt.detect(path)
        if root is not None:
            return fmt, root
    raise MissingResourceError(f"{path}: no {' or '.join(f.what for f in FORMATS)} found")


def checkpoint_root(checkpoint: str | os.PathLike[str]) -> Path:
    return detect_format(checkpoint)[1]


@dataclasses.dataclass
class CheckpointIndex:
    root: Path
    format: str
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
        fmt, root = detect_format(checkpoint)
        cfg = config or load_model_config(root, preset)
        entries = [
            IndexEntry(i, spec, str(path), ref, path.stat().st_size)
            for i, (spec, path, ref) in enumerate(fmt.read(root, cfg, workers))
        ]
        return cls(root, fmt.name, cfg, entries)

    def __iter__(self) -> Iterator[IndexEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def by_name(self) -> dict[str, IndexEntry]:
        return {e.name: e for e in self.entries}

    @property
    def file_bytes(self) -> int:
        return sum(e.file_bytes for e in self.entries)
