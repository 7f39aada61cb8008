"""Load a checkpoint onto a device mesh with bounded host memory.

Each device's slice is read straight from the memory-mapped tensor files
(`jax.make_array_from_callback`): host RAM holds one shard at a time, never the model, and in a
multi-process run each process reads only the shards of its own devices. int8 weights stay
int8 on the devices; they are dequantized inside the jitted forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from grokctl.checkpoint.index import CheckpointIndex, IndexEntry
from grokctl.checkpoint.safe_pickle import ArrayRef, QuantRef
from grokctl.model.quant import QuantizedWeight8bit
from grokctl.model.sharding import mesh_shape, named, param_spec

Params = dict[str, dict[str, Any]]


@dataclass
class LoadStats:
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _device_array(ref: ArrayRef, name: str, mesh: Mesh, layout: str, scales: bool, stats: LoadStats) -> jax.Array:
    sizes = mesh_shape(mesh)
    spec = param_spec(name, ref.shape, sizes, layout, scales=scales)
    source = ref.memmap()

    def read(index: tuple[slice, ...]) -> np.ndarray:
        shard = np.ascontiguousarray(source[index])  # reads only this device's bytes
        stats.bytes_read += shard.nbytes
        return shard

    return jax.make_array_from_callback(ref.shape, named(mesh, spec), read)


def load_entry(entry: IndexEntry, mesh: Mesh, layout: str, stats: LoadStats) -> Any:
    ref = entry.ref
    if isinstance(ref, QuantRef):
        return QuantizedWeight8bit(
            _device_array(ref.weight, entry.name, mesh, layout, False, stats),
            _device_array(ref.scales, entry.name, mesh, layout, True, stats),
        )
    return _device_array(ref, entry.name, mesh, layout, False, stats)


def load_params(
    index: CheckpointIndex,
    mesh: Mesh,
    layout: str = "tensor",
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[Params, LoadStats]:
    """The haiku params tree {module: {leaf: array | QuantizedWeight8bit}} placed on `mesh`."""
    stats = LoadStats()
    total = sum(e.ref.nbytes for e in index)
    start = time.perf_counter()
    params: Params = {}
    done = 0
    for entry in index:
        params.setdefault(entry.spec.module, {})[entry.spec.leaf] = load_entry(entry, mesh, layout, stats)
        done += entry.ref.nbytes
        if on_progress:
            on_progress(done, total)
    jax.block_until_ready(params)
    stats.seconds = time.perf_counter() - start
    return params, stats
