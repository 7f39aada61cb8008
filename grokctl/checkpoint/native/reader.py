"""Reading native checkpoints: safetensors headers -> `ArrayRef` / `QuantRef` (no tensor data).

`parse_header` validates one shard's header (length sane, JSON, known dtypes, offsets inside the
file and non-overlapping, byte counts consistent with shapes); `read` checks every parameter's
shape and dtype against the config. Every failure is an IntegrityError naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from grokctl.checkpoint.layout import ParamSpec, param_specs
from grokctl.checkpoint.native.format import (
    BF16,
    CODES,
    DTYPES,
    EMBEDDINGS,
    HEADER_LIMIT,
    INDEX_NAME,
    QWEIGHT,
    SCALES,
    QuantScheme,
)
from grokctl.checkpoint.refs import ArrayRef, QuantRef, TensorRef
from grokctl.config import ModelConfig
from grokctl.errors import IntegrityError

NAME = "native"
WHAT = "model.safetensors.index.json (or *.safetensors)"
# -----------------------------------------------------------------------------------


def parse_header(path: str | os.PathLike[str]) -> tuple[dict[str, ArrayRef], dict[str, str]]:
    """Every tensor of one safetensors file as an ArrayRef (+ the `__metadata__`), from the
    header alone; IntegrityError naming the file for anything malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise IntegrityError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > HEADER_LIMIT or 8 + n > size:
                raise IntegrityError(
                    f"{path}: corrupt safetensors header length {n} (file {size} bytes)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    refs: dict[str, ArrayRef] = {}
    spans = []
    for key, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            if any(d < 0 for d in shape) or not isinstance(info["shape"], list):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{path}: bad header entry for {key!r}: {info!r}") from None
        if not 0 <= begin <= end <= data_len:
            raise IntegrityError(
                f"{path}: {key} data_offsets [{begin}, {end}] point past the file's {data_len} data bytes"
            )
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise IntegrityError(
                f"{path}: {key} has {end - begin} bytes for {info['dtype']}{list(shape)}"
            )
        spans.append((begin, end, key))
        refs[key] = ArrayRef(str(path), data_start + begin, shape, dtype)
    spans.sort()
    for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise IntegrityError(f"{path}: tensors {k0} and {k1} overlap")
    return refs, dict(meta) if isinstance(meta, dict) else {}


def detect(path: Path) -> Path | None:
    if (path / INDEX_NAME).is_file() or any(path.glob("*.safetensors")):
        return path
    return None


def read_scheme(root: Path) -> QuantScheme | None:
    """The quantization scheme in the index metadata (None when there is no index)."""
    index = root / INDEX_NAME
    if not index.is_file():
        return None
    try:
        return QuantScheme.from_json(json.loads(index.read_text())["metadata"]["quantization"])
    except (OSError, ValueError, KeyError, TypeError):
        raise IntegrityError(f"{index}: not a readable grokctl-native index") from None


def shard_files(root: Path) -> list[Path]:
    """The shards the index names (every *.safetensors when there is no index)."""
    index = root / INDEX_NAME
    if not index.is_file():
        return sorted(root.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"{index}: not a readable safetensors index") from None
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise IntegrityError(f"{root / missing[0]}: shard named in {INDEX_NAME} is missing")
    return [root / n for n in names]


def _expect(
    path: str, key: str, ref: ArrayRef, dtypes: tuple[np.dtype, ...], shape: tuple[int, ...]
) -> None:
    if ref.dtype not in dtypes or ref.shape != shape:
        want = "|".join(CODES[d] for d in dtypes)
        raise IntegrityError(
            f"{path}: {key} is {CODES.get(ref.dtype, ref.dtype)}{list(ref.shape)}, expected {want}{list(shape)}"
        )


def check_entry(spec: ParamSpec, refs: dict[str, ArrayRef]) -> TensorRef:
    """The TensorRef of `spec` from a shard's keys, its shapes and dtypes checked."""
    name, f32 = spec.name, DTYPES["F32"]
    floats = (f32, BF16, DTYPES["F16"])
    if name in refs:
        ref = refs[name]
        if spec.quantized:
            raise IntegrityError(f"{ref.path}: {name} should be quantized ({name}{QWEIGHT})")
        _expect(ref.path, name, ref, floats if name == EMBEDDINGS else (f32,), spec.shape)
        return ref
    qw, sc = refs.get(name + QWEIGHT), refs.get(name + SCALES)
    if qw is None or sc is None:
        raise IntegrityError(f"{name}: not found in the checkpoint's safetensors shards")
    if name == EMBEDDINGS:
        _expect(qw.path, name + QWEIGHT, qw, (DTYPES["I8"],), spec.shape)
        _expect(sc.path, name + SCALES, sc, floats, (spec.shape[0], 1))
        return QuantRef(qw, sc, 8)
    if not spec.quantized:
        raise IntegrityError(f"{qw.path}: {name} should be a plain array")
    *lead, k, n = spec.shape
    bits = 4 if qw.dtype == DTYPES["U8"] else 8
    _expect(
        qw.path,
        name + QWEIGHT,
        qw,
        (DTYPES["I8"], DTYPES["U8"]),
        spec.shape if bits == 8 else (*lead, k // 2, n),
    )
    g = sc.shape[-2] if len(sc.shape) == len(spec.shape) else 0
    if g == 0 or k % g or (bits == 4 and (k // g) % 2):
        raise IntegrityError(
            f"{sc.path}: {name}{SCALES} {list(sc.shape)} do not fit {list(spec.shape)}"
        )
    _expect(sc.path, name + SCALES, sc, floats, (*lead, g, n))
    return QuantRef(qw, sc, bits)


def read(root: Path, cfg: ModelConfig, workers: int = 8) -> list[tuple[ParamSpec, Path, TensorRef]]:
    """(spec, file, ref) of every parameter in layout order; IntegrityError for anything wrong."""
    files = shard_files(root)
    if not files:
        raise IntegrityError(f"{root}: no safetensors shards")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        headers = list(pool.map(parse_header, files))
    refs: dict[str, ArrayRef] = {}
    for path, (h, _) in zip(files, headers):
        for key, ref in h.items():
            if key in refs:
                raise IntegrityError(f"{path}: {key} also in {refs[key].path}")
            refs[key] = ref
    out: list[tuple[ParamSpec, Path, TensorRef]] = []
    for spec in param_specs(cfg):
        tref = check_entry(spec, refs)
        main = tref.weight if isinstance(tref, QuantRef) else tref
        out.append((spec, Path(main.path), tref))
    known = {
        k for spec in param_specs(cfg) for k in (spec.name, spec.name + QWEIGHT, spec.name + SCALES)
    }
    extra = sorted(set(refs) - known)
    if extra:
        raise IntegrityError(
            f"{refs[extra[0]].path}: unexpected tensor {extra[0]!r} for this config"
        )
    return out
