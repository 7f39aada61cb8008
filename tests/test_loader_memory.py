"""The loader: exact per-device slices from the files, each read once, bounded host memory."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from grokctl.checkpoint.index import CheckpointIndex
from grokctl.checkpoint.refs import QuantRef
from grokctl.checkpoint.xai.safe_pickle import parse_tensor_file
from grokctl.checkpoint.xai.writer import ReleaseQuantWeight, dump_tensor, write_checkpoint
from grokctl.config import preset
from grokctl.loader import load_params, read_slice
from grokctl.model.sharding import make_mesh


@pytest.mark.parametrize(
    ("shape", "dtype", "index"),
    [
        ((6, 40, 24), np.int8, (slice(None), slice(None), slice(8, 16))),  # column shard
        ((6, 40, 24), np.int8, (slice(None), slice(10, 30), slice(None))),  # row shard
        ((6, 40, 24), np.int8, (slice(2, 4), slice(None), slice(None))),  # expert shard
        ((300, 7), np.float32, (slice(None), slice(3, 5))),
        ((1000,), np.float32, (slice(250, 750),)),
        ((5, 16), ml_dtypes.bfloat16, (slice(None), slice(0, 8))),
    ],
)
@pytest.mark.parametrize("window", [64, 4096, 1 << 20])
def test_read_slice_matches_numpy(tmp_path: Path, shape, dtype, index, window: int) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal(shape) * 50).astype(dtype)
    dump_tensor(tmp_path / "t", arr)
    ref = parse_tensor_file(tmp_path / "t")
    got = read_slice(ref, index, window=window)
    assert got.flags.c_contiguous and got.dtype == arr.dtype
    np.testing.assert_array_equal(got, arr[index])


@pytest.mark.parametrize("mesh_text", ["1x8", "2x4"])
def test_every_device_holds_exactly_its_slice(grok_tiny: Path, mesh_text: str) -> None:
    index = CheckpointIndex.open(grok_tiny)
    seen: list[tuple[int, int]] = []
    params, stats = load_params(
        index, make_mesh(mesh_text), on_progress=lambda d, t: seen.append((d, t))
    )
    data = 0
    for entry in index:
        value = params[entry.spec.module][entry.spec.leaf]
        pairs = (
            [(value.weight, entry.ref.weight), (value.scales, entry.ref.scales)]
            if isinstance(entry.ref, QuantRef)
            else [(value, entry.ref)]
        )
        for arr, ref in pairs:
            source = ref.memmap()
            assert arr.shape == ref.shape and arr.dtype == ref.dtype
            for shard in arr.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), source[shard.index])
            data += ref.nbytes
    # Weights are replicated over `data`: each distinct slice is read once, placed D times.
    assert stats.bytes_read == data
    placed = sum(
        s.data.nbytes for leaf in jax.tree_util.tree_leaves(params) for s in leaf.addressable_shards
    )
    assert stats.bytes_placed == placed
    assert placed > data  # norms (and on 2x4 everything) sit on several devices
    assert stats.tensors == len(index) and stats.gb_per_s > 0
    # Progress counts bytes read, monotonically, ending at the total.
    assert [t for _, t in seen] == [stats.bytes_read] * len(seen)
    assert [x for x, _ in seen] == sorted(x for x, _ in seen) and seen[-1][0] == stats.bytes_read


# --- peak host memory ---------------------------------------------------------------------------

BOUND = 256 << 20  # host bytes beyond what the devices hold, for a 1.6 GB checkpoint

_PROBE = r"""
import json, os, resource, sys
import jax, numpy as np
from grokctl.checkpoint.index import CheckpointIndex
from grokctl.loader import load_params
from grokctl.model.sharding import make_mesh

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

index = CheckpointIndex.open(sys.argv[1])
mesh = make_mesh(sys.argv[2])
jax.block_until_ready(jax.device_put(np.zeros(4), jax.devices()[0]))  # runtime up
before = status("VmRSS:")
try:  # the peak of the loading alone: reset VmHWM (an earlier import-time peak must not count)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    hwm = True
except OSError:
    hwm = False
params, stats = load_params(index, mesh)
if hwm:
    peak = status("VmHWM:")
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "file_bytes": index.file_bytes, **stats.to_json()}))
"""


def _big_checkpoint(path: Path) -> Path:
    """~1.6 GB in the released format: 2 layers of 8 experts [8, 2048, 16384] int8 (268 MB each)."""
    cfg = dataclasses.replace(
        preset("grok-tiny"),
        emb_size=2048,
        widening_factor=12.0,
        num_layers=2,
        vocab_size=1024,
        key_size=64,
        num_q_heads=16,
        num_kv_heads=8,
    ).validate()
    rng = np.random.default_rng(0)
    block = rng.integers(-127, 128, size=1 << 20, dtype=np.int8)

    def make(spec):  # cheap but non-constant content
        if spec.quantized:
            weight = np.resize(block, int(np.prod(spec.shape))).reshape(spec.shape)
            return ReleaseQuantWeight(weight, np.full(spec.scales_shape, 0.01, ml_dtypes.bfloat16))
        return (rng.standard_normal(spec.shape) * 0.02).astype(np.float32)

    return write_checkpoint(path, cfg, make)


@pytest.mark.slow
def test_peak_host_rss_is_bounded(tmp_path: Path) -> None:
    """Peak RSS of the loading process, minus what was resident before and what the (CPU)
    devices hold at the end, stays under BOUND for a checkpoint 6x larger than BOUND."""
    ckpt = _big_checkpoint(tmp_path / "big")
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ckpt), "1x8"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["file_bytes"] > 6 * BOUND
    overhead = r["peak"] - r["before"] - r["bytes_placed"]
    assert overhead < BOUND, f"loader held {overhead / 2**20:.0f} MiB beyond the device arrays"
    assert overhead < 8 * r["largest_shard"]
