"""One int8 matmul x [M, K] @ W [K, N] (bf16 block scales): dequantize-then-dot vs chunked scan.

    python benchmarks/qmatmul_bench.py [--k 1024] [--n 5464] [--m 1 8 128]

Reports the median time over 20 calls and the int8 bytes read per second.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from grokctl.model.quant import QuantizedWeight8bit, chunked_qmatmul, qmatmul
from grokctl.quantizers.int8 import quantize_int8


def median_ms(fn, *args, reps: int = 20) -> float:  # type: ignore[no-untyped-def]
    fn(*args).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=5464)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 128])
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    q = quantize_int8(rng.standard_normal((a.k, a.n)).astype(np.float32), 1)
    w = QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))
    for m in a.m:
        x = jnp.asarray(rng.standard_normal((m, a.k)), jnp.bfloat16)
        row = {"m": m, "k": a.k, "n": a.n}
        for label, chunked in (("dequant_dot_ms", False), ("chunked_ms", True)):
            with chunked_qmatmul(chunked):  # fresh function: the flag is read at trace time
                row[label] = round(median_ms(jax.jit(lambda x_, w_: qmatmul(x_, w_)), x, w), 3)
        row["int8_gb_s_chunked"] = round(a.k * a.n / row["chunked_ms"] / 1e6, 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
