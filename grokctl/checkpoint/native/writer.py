"""Writing native checkpoints: `NativeWriter` streams tensors into safetensors shards.

The header space of each shard is reserved up front (enough for every key of the model, at most
1 MiB) and filled with the JSON header, padded with spaces, when the shard is closed: a shard is
written front to back once and never held in memory. See `format.py` for the layout.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from grokctl.atomic import atomic_dir, atomic_write_json, fsync_dir
from grokctl.checkpoint.layout import ParamSpec, param_specs
from grokctl.checkpoint.native.format import (
    BF16,
    CODES,
    EMBEDDINGS,
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    MAX_SHARD_BYTES,
    QWEIGHT,
    SCALES,
    TOKENIZER_NAME,
    QuantScheme,
    native_config_json,
    shard_name,
)
from grokctl.config import CONFIG_FILENAME, ModelConfig
from grokctl.errors import UsageError
from grokctl.fetch.common import sha256_file
from grokctl.fetch.manifest import MANIFEST_NAME, FileRecord, Manifest, now_iso

# -----------------------------------------------------------------------------------

Value = np.ndarray | tuple[np.ndarray, np.ndarray]


def _entry_json(key: str, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int) -> str:
    return json.dumps(
        {key: {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [begin, end]}}
    )[1:-1]


def _header_reserve(cfg: ModelConfig) -> int:
    """Bytes reserved for one shard's JSON header: enough for every key of the model with
    20-digit offsets (so any subset fits), capped at 1 MiB; a multiple of 8."""
    need = 64
    for spec in param_specs(cfg):
        shape = max(20 * len(spec.shape), 80)
        need += 2 * (len(spec.name) + len(QWEIGHT) + 60 + shape + 42)
    return min(1 << 20, need + (-need) % 8)


class _Shard:
    def __init__(self, path: Path, reserve: int):
        self.path, self.reserve = path, reserve
        self.fh = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.fh.truncate(8 + reserve)
        self.fh.seek(8 + reserve)
        self.entries: list[str] = []
        self.keys: list[str] = []
        self.size = 0  # data bytes

    def header_len(self, extra: int = 0) -> int:
        return (
            len('{"__metadata__":{"format":"grokctl-native"},}')
            + sum(len(e) + 1 for e in self.entries)
            + extra
        )

    def write(self, key: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        begin = self.size
        flat = arr.reshape(-1).view(np.uint8)
        step = 64 << 20
        for a in range(0, flat.size, step):
            self.fh.write(flat[a : a + step].data)
        self.size += arr.nbytes
        self.entries.append(_entry_json(key, arr.dtype, arr.shape, begin, self.size))
        self.keys.append(key)

    def close(self) -> None:
        meta = json.dumps({"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        header = (
            "{" + f'"__metadata__":{meta}' + "".join("," + e for e in self.entries) + "}"
        ).encode()
        if len(header) > self.reserve:  # the writer starts a new shard before this can happen
            raise AssertionError("safetensors header overflows its reserved space")
        header += b" " * (self.reserve - len(header))
        self.fh.seek(0)
        self.fh.write(struct.pack("<Q", len(header)) + header)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


class NativeWriter:
    """Stream tensors into safetensors shards inside `dst_tmp_dir` (a directory the caller
    renames into place when complete, e.g. from `atomic.atomic_dir`).

    `add(name, value)`: `value` is a plain array, or `(qweight, scales)` as described in the
    module docstring (int8 [..., K, N] or packed uint8 [..., K/2, N]; bf16 [..., G, N]).
    Tensors are written as they come (host RAM: one tensor); a shard is closed when the next
    tensor would take it past `max_shard_bytes`. `finish(tokenizer=...)` renames the shards to
    `model-0000i-of-0000N.safetensors` and writes the index, config.json (last but one) and the
    manifest of every file in the directory (last).
    """

    def __init__(
        self,
        dst_tmp_dir: str | os.PathLike[str],
        config: ModelConfig,
        scheme: QuantScheme,
        max_shard_bytes: int = MAX_SHARD_BYTES,
    ):
        self.dir = Path(dst_tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config, self.scheme, self.max_shard_bytes = config, scheme, max_shard_bytes
        self.specs = {s.name: s for s in param_specs(config)}
        self.reserve = _header_reserve(config)
        self.shards: list[_Shard] = []
        self.names: set[str] = set()
        self.total_size = 0

    def _shard_for(self, nbytes: int, entries_len: int) -> _Shard:
        cur = self.shards[-1] if self.shards else None
        if (
            cur is None
            or (cur.size and cur.size + nbytes > self.max_shard_bytes)
            or (cur.header_len(entries_len) + 200 > self.reserve)
        ):
            if cur is not None:
                cur.close()
            cur = _Shard(self.dir / f".shard-{len(self.shards) + 1:05d}.part", self.reserve)
            self.shards.append(cur)
        return cur

    def add(self, name: str, value: Value) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise UsageError(f"{name}: not a parameter of this model")
        if name in self.names:
            raise UsageError(f"{name}: added twice")
        arrays = self._check(spec, value)
        nbytes = sum(a.nbytes for _, a in arrays)
        entries = sum(len(_entry_json(k, a.dtype, a.shape, 10**19, 10**19)) + 1 for k, a in arrays)
        shard = self._shard_for(nbytes, entries)
        for key, arr in arrays:
            shard.write(key, arr)
        self.names.add(name)
        self.total_size += nbytes

    def _check(self, spec: ParamSpec, value: Value) -> list[tuple[str, np.ndarray]]:
        name = spec.name
        if not isinstance(value, tuple):
            arr = np.asarray(value)
            ok_dtypes = (np.float32, BF16) if name == EMBEDDINGS else (np.float32,)
            if spec.quantized or arr.shape != spec.shape or arr.dtype not in ok_dtypes:
                raise UsageError(f"{name}: {arr.dtype}{list(arr.shape)} is not how it is stored")
            return [(name, arr)]
        q, s = (np.asarray(a) for a in value)
        if name == EMBEDDINGS:
            want_q: tuple[int, ...] = spec.shape
            want_s: tuple[int, ...] = (spec.shape[0], 1)
            ok = q.dtype == np.int8
        elif spec.quantized:
            *lead, k, n = spec.shape
            bits = 8 if q.dtype == np.int8 else 4
            want_q = spec.shape if bits == 8 else (*lead, k // 2, n)
            g = s.shape[-2] if s.ndim >= 2 else 0
            want_s = (*lead, g, n)
            ok = (
                q.dtype in (np.int8, np.uint8)
                and bits == self.scheme.bits
                and g > 0
                and k % g == 0
                and (bits == 8 or (k // g) % 2 == 0)  # a packed byte never straddles groups
            )
        else:
            raise UsageError(f"{name}: a plain array in this format, not a quantized weight")
        if not ok or q.shape != want_q or s.shape != want_s or s.dtype != BF16:
            raise UsageError(
                f"{name}: ({q.dtype}{list(q.shape)}, {s.dtype}{list(s.shape)}) does not fit "
                f"{self.scheme.bits}-bit storage of {list(spec.shape)}"
            )
        return [(name + QWEIGHT, q), (name + SCALES, s)]

    def finish(self, tokenizer: str | os.PathLike[str] | None = None) -> list[str]:
        """Close the last shard, write the index, config and manifest; the shard file names."""
        missing = [n for n in self.specs if n not in self.names]
        if missing:
            raise UsageError(f"{len(missing)} parameters never added (first: {missing[0]})")
        if self.shards:
            self.shards[-1].close()
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(self.shards, 1):
            final = shard_name(i, n)
            os.replace(shard.path, self.dir / final)
            weight_map.update({k: final for k in shard.keys})
        quant = self.scheme.to_json()
        atomic_write_json(
            self.dir / INDEX_NAME,
            {
                "metadata": {
                    "total_size": self.total_size,
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "quantization": quant,
                },
                "weight_map": dict(sorted(weight_map.items())),
            },
        )
        if tokenizer is not None and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, self.dir / TOKENIZER_NAME)
        atomic_write_json(self.dir / CONFIG_FILENAME, native_config_json(self.config, self.scheme))
        write_manifest(self.dir)
        fsync_dir(self.dir)
        return [shard_name(i, n) for i in range(1, n + 1)]


def write_manifest(root: Path, workers: int = 4) -> Manifest:
    """`grokctl-manifest.json` with the size and sha256 of every other file under `root`."""
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    )
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(sha256_file, files))
    manifest = Manifest(root)
    manifest.add_source("local:grokctl-native", kind="local", format=FORMAT)
    for path, digest in zip(files, digests):
        rel = path.relative_to(root).as_posix()
        manifest.record(rel, FileRecord(path.stat().st_size, digest, "local", None, now_iso()))
    manifest.save()
    return manifest


def write_native(
    dst: str | os.PathLike[str],
    config: ModelConfig,
    scheme: QuantScheme,
    tensors: Iterable[tuple[str, Value]],
    max_shard_bytes: int = MAX_SHARD_BYTES,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a whole native checkpoint to `dst` (under a temporary name, renamed when complete)."""
    with atomic_dir(dst) as tmp:
        writer = NativeWriter(tmp, config, scheme, max_shard_bytes)
        for name, value in tensors:
            writer.add(name, value)
        writer.finish(tokenizer)
    return Path(dst)


def repack_release(index: Any, embeddings: str = "f32") -> Iterator[tuple[str, Value]]:
    """The tensors of a released (int8) checkpoint index as `add` takes them: the same int8
    values and block scales (a lossless repack); the embedding table f32 or bf16 (exact)."""
    for entry in index:
        value = entry.load()
        if isinstance(value, tuple):
            yield entry.name, (np.asarray(value[0]), np.asarray(value[1]).astype(BF16))
        elif entry.name == EMBEDDINGS and embeddings == "bf16":
            yield entry.name, np.asarray(value).astype(BF16)
        else:
            yield entry.name, np.asarray(value)
