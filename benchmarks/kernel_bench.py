"""The native CPU kernels alone, at bench-l2's decode shapes (wall and CPU ms, median).

    PYTHONPATH=. python benchmarks/kernel_bench.py [--reps 15]
    GROKCTL_CPU_THREADS=1 PYTHONPATH=. python benchmarks/kernel_bench.py
    PYTHONPATH=. python benchmarks/kernel_bench.py --logits-rows 1 8 16 32

- logits: [1, 1024] x bf16 table [131072, 1024]^T (268 MB), the NT kernel vs XLA's bf16 einsum;
- experts: the 8 experts' [1, 1024] x int8 [1024, 5120] in one jitted program (42 MB), by index;
- with --logits-rows: the logits of M rows (a batched decode step) over the bf16 table and over an
  int8 table (`quantize --embeddings int8`), one line per M.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from grokctl import kernels

sys.path.insert(0, os.path.dirname(__file__))  # the sibling benchmark's timer
from qmatmul_bench import median_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--logits-rows", type=int, nargs="+", default=[])
    a = ap.parse_args()
    if not kernels.available():
        raise SystemExit("grokctl CPU kernels unavailable (make install, or GROKCTL_CPU_KERNELS)")
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((131072, 1024)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, 1024)), jnp.bfloat16)
    if a.logits_rows:
        t8 = jnp.asarray(rng.integers(-127, 128, table.shape, dtype=np.int8))
        for m in a.logits_rows:
            xm = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
            line: dict[str, object] = {"m": m, "kernels": kernels.info()}
            for name, fn, t in (
                ("bf16", kernels.matmul_nt_bf16, table),
                ("int8", kernels.matmul_nt_int8, t8),
            ):
                ms, cpu = median_ms(jax.jit(fn), xm, t, reps=a.reps)
                line[f"{name}_ms"], line[f"{name}_cpu_ms"] = round(ms, 2), round(cpu, 2)
                line[f"{name}_gflop_s"] = round(2 * m * t.size / ms / 1e6, 1)
            print(json.dumps(line))
        return
    xla = jax.jit(lambda x_, t: jnp.einsum("mk,vk->mv", x_, t, preferred_element_type=jnp.float32))
    e, k, n, g = 8, 1024, 5120, 8
    wq = jnp.asarray(rng.integers(-127, 128, (e, k, n), dtype=np.int8))
    s = jnp.asarray(rng.standard_normal((e, g, n)), jnp.bfloat16)

    @jax.jit
    def experts(x_, w_, s_):  # type: ignore[no-untyped-def]
        return sum(kernels.qmatmul(x_, w_, s_, i) for i in range(e))

    row = {"kernels": kernels.info()}
    row["logits_kernel_ms_cpu_ms"] = median_ms(
        jax.jit(kernels.matmul_nt_bf16), x, table, reps=a.reps
    )
    row["logits_xla_ms_cpu_ms"] = median_ms(xla, x, table, reps=a.reps)
    row["experts_kernel_ms_cpu_ms"] = median_ms(experts, x, wq, s, reps=a.reps)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
