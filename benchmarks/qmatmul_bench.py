"""One int8 matmul x [M, K] @ W [K, N] (bf16 block scales): XLA dequantize-then-dot, the chunked
scan, and the native kernel (grokctl.kernels), plus the bf16 logits product.

    python benchmarks/qmatmul_bench.py [--k 1024] [--n 5120] [--groups 8] [--m 1 8 128 512]
        [--x bf16|f32]   (f32: an expert's output projection, whose x is f32)

Reports the median wall and CPU time over `--reps` calls and the int8 bytes read per second
(from the wall time). Run from the
repository root with PYTHONPATH=. to measure this checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from grokctl import kernels
from grokctl.model.quant import QuantizedWeight8bit, chunked_qmatmul, qmatmul
from grokctl.quantizers.int8 import quantize_int8


def median_ms(fn, *args, reps: int = 20) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median wall and CPU (all threads of this process) milliseconds per call. On a loaded
    machine the CPU time is the steadier measure of the work a call does."""
    fn(*args).block_until_ready()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn(*args).block_until_ready()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(wall) * 1e3), float(np.median(cpu) * 1e3)


@contextlib.contextmanager
def kernels_env(enabled: bool) -> Iterator[None]:
    old = os.environ.get("GROKCTL_CPU_KERNELS")
    os.environ["GROKCTL_CPU_KERNELS"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["GROKCTL_CPU_KERNELS"]
        else:
            os.environ["GROKCTL_CPU_KERNELS"] = old


def compiled(mode: str, x: jax.Array, w: QuantizedWeight8bit):  # type: ignore[no-untyped-def]
    """dequant (XLA dequantize-then-dot), chunked (XLA scan, <= 16 rows), engine (qmatmul as the
    single-device CPU engine traces it: the kernel up to KERNEL_MAX_M rows, else XLA) or kernel
    (the native kernel at any M)."""
    if mode == "kernel":
        fn = lambda x_, w_: kernels.qmatmul(x_, w_.weight, w_.scales)  # noqa: E731
        return jax.jit(fn).lower(x, w).compile()
    with kernels_env(mode == "engine"), chunked_qmatmul(mode != "dequant"):  # trace time
        return jax.jit(lambda x_, w_: qmatmul(x_, w_)).lower(x, w).compile()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=5120)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 128, 512])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--x", choices=["bf16", "f32"], default="bf16")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    q = quantize_int8(rng.standard_normal((a.k, a.n)).astype(np.float32), a.groups)
    w = QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))
    modes = ["dequant", "chunked"] + (["engine", "kernel"] if kernels.available() else [])
    for m in a.m:
        x = jnp.asarray(
            rng.standard_normal((m, a.k)), jnp.bfloat16 if a.x == "bf16" else jnp.float32
        )
        row: dict[str, object] = {"m": m, "k": a.k, "n": a.n, "x": a.x, "kernels": kernels.info()}
        for mode in modes:
            ms, cpu_ms = median_ms(compiled(mode, x, w), x, w, reps=a.reps)
            row[f"{mode}_ms"] = round(ms, 3)
            row[f"{mode}_cpu_ms"] = round(cpu_ms, 3)
            row[f"{mode}_int8_gb_s"] = round(a.k * a.n / ms / 1e6, 2)
            row[f"{mode}_gflop_s"] = round(2 * m * a.k * a.n / ms / 1e6, 1)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
