"""Decode at batch 1, timed the way `generate` runs it: K decode steps per device call
(`Engine.decode_steps`; K = 1: one `decode` and one `sample` call a step), call c+1 dispatched
before call c's tokens are fetched. Per series and K: wall ms per step (p50 of the calls' per-
token times, and the mean) and the host thread's CPU ms per step; the K values alternate inside
each series, in one process. For the knobs of the native kernels' threads:

    PYTHONPATH=. python benchmarks/decode_step.py CKPT [--steps 64] [--series 3] [--decode-steps 1,4]
    GROKCTL_CPU_SPIN_US=0 PYTHONPATH=. python benchmarks/decode_step.py CKPT

docs/PERFORMANCE.md, "Decode, fifth round" and "seventh round".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import grokctl
from grokctl.bench.cases import timed_decode
from grokctl.sampling import RowSampling


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--series", type=int, default=3)
    ap.add_argument("--decode-steps", default="1", help="K values, comma list (alternated)")
    a = ap.parse_args()
    ks = [int(k) for k in a.decode_steps.split(",")]
    eng = grokctl.load_model(a.checkpoint).engine
    rows = RowSampling.of([0], vocab_limit=eng.cfg.vocab_size)

    def series(steps: int, k: int) -> tuple[list[float], float]:
        cache = eng.new_cache(1, min(1024, eng.cfg.sequence_len))
        cpu0 = time.thread_time()
        per_step, _ = timed_decode(eng, np.array([5], np.int32), cache, rows, steps, k)
        return per_step, (time.thread_time() - cpu0) / steps

    for k in ks:
        series(8, k)  # compiles and warms
    for _ in range(a.series):
        for k in ks:
            walls, cpu = series(a.steps, k)
            print(
                json.dumps(
                    {
                        "decode_steps": k,
                        "step_ms_p50": round(statistics.median(walls) * 1e3, 2),
                        "step_ms_mean": round(statistics.mean(walls) * 1e3, 2),
                        "host_cpu_ms_per_step": round(cpu * 1e3, 3),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
