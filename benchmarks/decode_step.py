"""One decode step at batch 1, timed the way `generate` runs it (pipelined: step s+1 dispatched
before step s's token is fetched): wall ms per step (p50 and mean) and the host thread's CPU ms
per step, a few series in one process. For the knobs of the native kernels' threads:

    PYTHONPATH=. python benchmarks/decode_step.py CKPT [--steps 64] [--series 3]
    GROKCTL_CPU_SPIN_US=0 PYTHONPATH=. python benchmarks/decode_step.py CKPT

docs/PERFORMANCE.md, "Decode, fifth round".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import grokctl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--series", type=int, default=3)
    a = ap.parse_args()
    eng = grokctl.load_model(a.checkpoint).engine
    zeros, ones, seeds = np.zeros(1, np.float32), np.ones(1, np.float32), np.zeros(1, np.int32)

    def series(steps: int) -> tuple[list[float], float]:
        cache = eng.new_cache(1, min(1024, eng.cfg.sequence_len))
        logits, cache = eng.decode(np.array([5], np.int32), cache)
        tok = eng.sample(logits, seeds, 0, zeros, ones, seeds, eng.cfg.vocab_size)
        walls, cpu0, last = [], time.thread_time(), time.perf_counter()
        for step in range(steps):
            current = tok
            if step + 1 < steps:
                logits, cache = eng.decode(current, cache)
                tok = eng.sample(logits, seeds, step + 1, zeros, ones, seeds, eng.cfg.vocab_size)
            eng.fetch(current)
            now = time.perf_counter()
            walls.append(now - last)
            last = now
        return walls, (time.thread_time() - cpu0) / steps

    series(8)  # compiles and warms
    for _ in range(a.series):
        walls, cpu = series(a.steps)
        print(
            json.dumps(
                {
                    "step_ms_p50": round(statistics.median(walls) * 1e3, 2),
                    "step_ms_mean": round(statistics.mean(walls) * 1e3, 2),
                    "host_cpu_ms_per_step": round(cpu * 1e3, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
