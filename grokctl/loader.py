"""Load a checkpoint onto a device mesh with bounded host memory.

Each device's slice is read straight from the tensor files through small memory-mapped windows
(`read_slice`), placed on its device, and the host copy is dropped before the next shard is
read: host RAM holds about one shard per worker (plus one mapping window), never the model.
A shard that several local devices share (weights are replicated over `data`) is read once.
In a multi-process run each process reads only the shards of its own devices. int8 weights
stay int8 (and int4 stays packed two per byte) on the devices; they are dequantized inside the
jitted forward pass. The format does not matter here: released pickles and native safetensors
shards are both read through their `ArrayRef` byte offsets.

Measured (tests/test_loader_memory.py): loading a 1.6 GB checkpoint onto 8 CPU devices, peak
RSS beyond what the devices hold stays under 256 MiB (about 50 MiB observed; largest shard
33.5 MB), where `jax.make_array_from_callback` over whole-file memory maps held ~530 MB: it
gathers every local shard of a tensor before placing any, and keeps the mapped pages resident.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from grokctl.checkpoint.index import CheckpointIndex, IndexEntry
from grokctl.checkpoint.refs import ArrayRef, QuantRef
from grokctl.config import default
from grokctl.errors import IntegrityError
from grokctl.model.quant import QuantizedWeight
from grokctl.model.sharding import mesh_shape, named, param_spec, replicated

Params = dict[str, dict[str, Any]]
Index = tuple[slice, ...]
OnProgress = Callable[[int, int], None]

WINDOW_BYTES = 16 << 20  # largest file range mapped at once while copying a strided shard
DEFAULT_WORKERS = 2  # tensors loaded concurrently (each holds about one shard on the host)


@dataclass
class LoadStats:
    bytes_read: int = 0  # bytes this process read from the files (a shared shard counts once)
    bytes_placed: int = 0  # bytes written to this process's devices (replicas count each time)
    largest_shard: int = 0  # bytes of the largest single host-side shard buffer
    tensors: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_read": self.bytes_read,
            "bytes_placed": self.bytes_placed,
            "largest_shard": self.largest_shard,
            "tensors": self.tensors,
            "seconds": round(self.seconds, 3),
            "gb_per_s": round(self.gb_per_s, 3),
        }


# --- reading one slice --------------------------------------------------------------------------


def _bounds(index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    out = []
    for s, dim in zip(index, shape, strict=True):
        start, stop, step = s.indices(dim)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return out


def _copy_rows(
    fileno: int,
    offset: int,
    shape: tuple[int, ...],
    dtype: np.dtype,
    bounds: list[tuple[int, int]],
    out: np.ndarray,
    window: int,
) -> None:
    """out[...] = array(at `offset`, `shape`)[bounds], mapping at most `window` bytes at once."""
    (r0, r1), rest = bounds[0], bounds[1:]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    if row_bytes > window and len(shape) > 1:  # one row is too big: descend a dimension
        for i in range(r0, r1):
            _copy_rows(fileno, offset + i * row_bytes, shape[1:], dtype, rest, out[i - r0], window)
        return
    if _PREADV and all(r == (0, n) for r, n in zip(rest, shape[1:], strict=True)):
        _read_into(fileno, offset + r0 * row_bytes, out)  # whole rows: one contiguous range
        return
    inner = tuple(slice(a, b) for a, b in rest)
    step = max(1, window // max(row_bytes, 1))
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        start = offset + a * row_bytes
        base = start - start % mmap.ALLOCATIONGRANULARITY
        length = start - base + (b - a) * row_bytes
        with mmap.mmap(fileno, length, offset=base, access=mmap.ACCESS_READ) as mapped:
            view = np.frombuffer(mapped, dtype, (b - a) * row_bytes // dtype.itemsize, start - base)
            out[a - r0 : b - r0] = view.reshape(b - a, *shape[1:])[(slice(None), *inner)]
            del view  # release the buffer before the window is unmapped


_PREADV = hasattr(os, "preadv")


def _read_into(fileno: int, offset: int, out: np.ndarray) -> None:
    """Fill the C-contiguous `out` from the file at `offset` (the kernel copies; no mapping)."""
    buf = out.reshape(-1).view(np.uint8).data
    done = 0
    while done < len(buf):
        n = os.preadv(fileno, [buf[done:]], offset + done)
        if n <= 0:
            raise IntegrityError(f"tensor file ends inside an array (byte {offset + done})")
        done += n


def read_slice(ref: ArrayRef, index: Index, window: int = WINDOW_BYTES) -> np.ndarray:
    """A fresh C-ordered copy of `ref[index]`, read from the file without mapping all of it.

    Host memory: the result plus one mapping window (at most `window` bytes of file pages,
    more only when a single innermost row is larger).
    """
    bounds = _bounds(index, ref.shape)
    out = np.empty(tuple(b - a for a, b in bounds), ref.dtype)
    if out.size == 0:
        return out
    if ref.fortran_order or not ref.shape:  # never in the release; read through numpy
        return np.ascontiguousarray(ref.memmap()[index])
    with open(ref.path, "rb") as fh:
        _copy_rows(fh.fileno(), ref.offset, ref.shape, ref.dtype, bounds, out, window)
    return out


# --- placing one array --------------------------------------------------------------------------


def _groups(sharding: NamedSharding, shape: tuple[int, ...]) -> dict[tuple, tuple[Index, list]]:
    """This process's devices grouped by the slice they hold (replicas share one read)."""
    groups: dict[tuple, tuple[Index, list]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        full = tuple(s if isinstance(s, slice) else slice(None) for s in index or ())
        key = tuple(s.indices(d) for s, d in zip(full, shape, strict=True))
        groups.setdefault(key, (full, []))[1].append(device)
    return groups


def local_bytes(ref: ArrayRef, sharding: NamedSharding) -> int:
    """Bytes this process reads for `ref` (each distinct local slice once)."""
    total = 0
    for key in _groups(sharding, ref.shape):
        total += math.prod(stop - start for start, stop, _ in key) * ref.dtype.itemsize
    return total


class _Progress:
    def __init__(self, total: int, on_progress: OnProgress | None):
        self.total, self.done, self.cb = total, 0, on_progress
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.cb:
                self.cb(self.done, self.total)


def place_array(
    ref: ArrayRef, sharding: NamedSharding, stats: LoadStats, progress: _Progress | None = None
) -> jax.Array:
    """`ref` as a global array with `sharding`; this process reads only its own slices."""
    shards: list[jax.Array] = []
    for index, devices in _groups(sharding, ref.shape).values():
        host = read_slice(ref, index)
        placed = [jax.device_put(host, d) for d in devices]
        jax.block_until_ready(placed)  # the host copy may go once the transfers are done
        shards.extend(placed)
        with stats._lock:
            stats.bytes_read += host.nbytes
            stats.bytes_placed += host.nbytes * len(devices)
            stats.largest_shard = max(stats.largest_shard, host.nbytes)
        if progress:
            progress.add(host.nbytes)
        del host
    return jax.make_array_from_single_device_arrays(ref.shape, sharding, shards, dtype=ref.dtype)


# --- the whole checkpoint ----------------------------------------------------------------------


def _shardings(entry: IndexEntry, mesh: Mesh, layout: str) -> list[tuple[ArrayRef, NamedSharding]]:
    sizes = mesh_shape(mesh)
    ref = entry.ref
    if isinstance(ref, QuantRef) and not entry.spec.quantized:
        # A per-row int8 embedding table: the weight shards like the table, scales [V, 1] whole.
        return [
            (ref.weight, named(mesh, param_spec(entry.name, ref.weight.shape, sizes, layout))),
            (ref.scales, replicated(mesh)),
        ]
    if isinstance(ref, QuantRef):  # packed int4 rows [..., K/2, N] shard like the rows
        return [
            (ref.weight, named(mesh, param_spec(entry.name, ref.weight.shape, sizes, layout))),
            (
                ref.scales,
                named(mesh, param_spec(entry.name, ref.scales.shape, sizes, layout, True)),
            ),
        ]
    return [(ref, named(mesh, param_spec(entry.name, ref.shape, sizes, layout)))]


def load_entry(
    entry: IndexEntry, mesh: Mesh, layout: str, stats: LoadStats, progress: _Progress | None = None
) -> Any:
    arrays = [place_array(r, s, stats, progress) for r, s in _shardings(entry, mesh, layout)]
    with stats._lock:
        stats.tensors += 1
    if isinstance(entry.ref, QuantRef):
        return QuantizedWeight(arrays[0], arrays[1], bits=entry.ref.bits)
    return arrays[0]


def load_params(
    index: CheckpointIndex,
    mesh: Mesh,
    layout: str = default("layout"),
    on_progress: OnProgress | None = None,
    workers: int = DEFAULT_WORKERS,
) -> tuple[Params, LoadStats]:
    """The haiku params tree {module: {leaf: array | QuantizedWeight}} placed on `mesh`.

    `on_progress(done, total)` counts the bytes this process reads. Specs are checked for
    every tensor before any data is read, so a mesh that does not divide fails at once.
    """
    plan = [(entry, _shardings(entry, mesh, layout)) for entry in index]
    total = sum(local_bytes(r, s) for _, pairs in plan for r, s in pairs)
    stats, progress = LoadStats(), _Progress(total, on_progress)
    start = time.perf_counter()
    params: Params = {}

    def load(entry: IndexEntry) -> Any:
        return load_entry(entry, mesh, layout, stats, progress)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for entry, value in zip(index, pool.map(load, index), strict=True):
            params.setdefault(entry.spec.module, {})[entry.spec.leaf] = value
    jax.block_until_ready(params)
    stats.seconds = time.perf_counter() - start
    return params, stats
