"""What a benchmark runs on, and what that hardware allows: fingerprint, versions and probes.

`copy_bandwidth` (the memory roofline of a decode step) and `matmul_peak` (the compute roofline
of a prefill) are measured in the same process as the benchmark, so a figure and its limit share
the machine's state (other processes, frequency, threads).
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "sve",
)
PACKAGES = ("jax", "jaxlib", "dm-haiku", "numpy")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key and key not in info:
            info[key] = value.strip()
    return info


def hardware() -> dict[str, Any]:
    """CPU model, the vector/matrix flags that matter for kernels, cores and RAM."""
    import psutil

    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": usable,
        "ram_bytes": int(psutil.virtual_memory().total),
        "machine": platform.machine(),
        "os": platform.platform(),
    }


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("grokctl", *PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def commit() -> str:
    """`git rev-parse HEAD` of the source tree grokctl runs from (+ "-dirty" when it has local
    changes), else "v<package version>"."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                cwd=here.parent,
                capture_output=True,
                text=True,
                timeout=10,
            )
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "v" + package_versions()["grokctl"]


def devices(mesh: Any) -> dict[str, Any]:
    import jax

    devs = list(mesh.devices.flat)
    return {
        "backend": jax.default_backend(),
        "device_kind": getattr(devs[0], "device_kind", devs[0].platform),
        "device_count": len(jax.devices()),
        "mesh": "x".join(str(n) for n in mesh.devices.shape),
        "mesh_devices": len(devs),
        "process_count": jax.process_count(),
    }


# --- probes -----------------------------------------------------------------------------------


def host_copy_bandwidth(nbytes: int = 512 << 20, threads: int = 2, reps: int = 5) -> float:
    """GB/s of `threads` numpy copies of disjoint halves of an `nbytes` buffer (bytes read +
    bytes written, as STREAM's copy counts them); best of `reps`."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros_like(src)
    bounds = [(i * nbytes // threads, (i + 1) * nbytes // threads) for i in range(threads)]

    def copy(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])  # releases the GIL

    best = float("inf")
    for _ in range(reps + 1):  # the first pass faults the pages in
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def device_copy_bandwidth(device: Any, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """GB/s of a jitted elementwise pass (read + write) over an `nbytes` array on `device`."""
    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.zeros(nbytes // 4, jnp.int32), device)
    step = jax.jit(lambda a: a + 1)
    step(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        step(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * (nbytes // 4 * 4) / best / 1e9


def copy_bandwidth(mesh: Any, threads: int = 2) -> dict[str, Any]:
    """The memory roofline of this run: host copies on CPU, a device pass elsewhere."""
    import jax

    if jax.default_backend() == "cpu":
        nbytes = 512 << 20
        return {
            "gb_s": host_copy_bandwidth(nbytes, threads),
            "method": f"numpy copy, {threads} threads, {nbytes >> 20} MiB",
        }
    device = next(iter(mesh.devices.flat))
    return {"gb_s": device_copy_bandwidth(device), "method": "jitted a+1 over 1 GiB on device"}


def matmul_peak(mesh: Any, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, float]:
    """FLOP/s of a jitted square matmul per operand dtype on one device of `mesh` (best of 5),
    accumulated in f32 as the model's matmuls are (`preferred_element_type`): a bf16-output
    matmul misses the CPU's AMX / oneDNN path and read 6-8x lower than the model's own bf16 dots."""
    import jax
    import jax.numpy as jnp

    device = next(iter(mesh.devices.flat))
    n = 1024 if jax.default_backend() == "cpu" else 8192
    out = {}
    for name in dtypes:
        dtype = jnp.dtype(name)
        a = jax.device_put(jnp.ones((n, n), dtype), device)
        mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        mm(a, a).block_until_ready()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            mm(a, a).block_until_ready()
            best = min(best, time.perf_counter() - start)
        out[name] = 2 * n**3 / best
    return out


def host_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def device_peak_memory(mesh: Any) -> int | None:
    """Peak bytes in use on the busiest device of `mesh` (None where the backend keeps no stats)."""
    peaks = []
    for d in mesh.devices.flat:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # some backends raise instead of returning None
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None
