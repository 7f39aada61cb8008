"""Prefill and decode throughput of the engine, with bytes read and the ratio to memory bandwidth.

    python benchmarks/engine_bench.py CKPT [--moe sparse|dense] [--mesh 1x1] [--prompt 128] [--decode 32] [--batch 1]

Decode is memory-bound: a token must read the attention weights + the chosen experts' int8
weights of every layer + the unembedding table (grokctl.costmodel). `grokctl bench` is the
full tool (llama-bench cases, rooflines, --compare); this script stays for quick A/B runs. The script reports achieved GB/s of that lower bound
against a measured host memory bandwidth (numpy copy), so the number is a ratio to the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

import grokctl
from grokctl import costmodel, kernels
from grokctl.model.sharding import make_mesh


def host_bandwidth_gbs(n_bytes: int = 1 << 30, reps: int = 5, threads: int = 2) -> float:
    """Copy bandwidth (read + write bytes per second) of a 1 GB numpy copy split over
    `threads` threads (numpy releases the GIL while copying); best of `reps`."""
    src = np.ones(n_bytes, np.uint8)
    dst = np.empty_like(src)
    cuts = np.linspace(0, n_bytes, threads + 1).astype(int)

    def copy() -> None:
        def part(i: int) -> None:
            np.copyto(dst[cuts[i] : cuts[i + 1]], src[cuts[i] : cuts[i + 1]])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, range(threads)))

    best = min(_timed(copy) for _ in range(reps))
    return 2 * n_bytes / best / 1e9  # read + write


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_bytes_per_token(model, batch: int, moe: str = "sparse") -> int:  # type: ignore[no-untyped-def]
    """Weight bytes one decode step of an 8-bit model must read (grokctl.costmodel: int8
    weights + scales, chosen experts only, and the whole tied table at one byte per element),
    whatever precision the program happens to hold it in."""
    p = costmodel.Precision(weights="int8", embeddings="int8")
    return costmodel.decode_weight_bytes(model.config, batch, moe, precision=p).per_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--moe", default="sparse")
    ap.add_argument("--mesh", default="1x1")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--no-chunk", action="store_true", help="disable the chunked int8 matmul (A/B against it)"
    )
    a = ap.parse_args()
    d, m = (int(x) for x in a.mesh.split("x"))
    mesh = make_mesh(a.mesh, jax.devices()[: d * m])
    model = grokctl.load_model(a.checkpoint, mesh=mesh, moe=a.moe)
    eng, cfg = model.engine, model.config
    if a.no_chunk:
        eng.chunked_qmatmul = False
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, (a.batch, a.prompt)).astype(np.int32)
    lengths = np.full(a.batch, a.prompt, np.int32)
    cache_len = a.prompt + a.decode + 1

    def run_once() -> tuple[float, float, float]:
        cache = eng.new_cache(a.batch, cache_len)
        t0 = time.perf_counter()
        logits, cache = eng.prefill(prompt, lengths, cache)
        tok = np.asarray(logits).argmax(-1).astype(np.int32)
        t_prefill = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(a.decode):
            logits, cache = eng.decode(tok, cache)
            tok = np.asarray(logits).argmax(-1).astype(np.int32)
        cpu = (time.process_time() - c1) / a.decode
        return t_prefill, (time.perf_counter() - t1) / a.decode, cpu

    run_once()  # compile
    runs = [run_once() for _ in range(a.reps)]
    pre = [a.batch * a.prompt / r[0] for r in runs]
    dec = [a.batch / r[1] for r in runs]
    step = statistics.median(r[1] for r in runs)
    need = decode_bytes_per_token(model, a.batch, a.moe)
    bw = host_bandwidth_gbs()
    result = {
        "checkpoint": a.checkpoint,
        "moe": a.moe,
        "chunked_qmatmul": eng.chunked_qmatmul,
        "mesh": a.mesh,
        "batch": a.batch,
        f"pp{a.prompt}_tok_s": [round(statistics.mean(pre), 1), round(statistics.pstdev(pre), 1)],
        f"tg{a.decode}_tok_s": [round(statistics.mean(dec), 2), round(statistics.pstdev(dec), 2)],
        "decode_ms_per_step": round(step * 1e3, 2),
        # CPU seconds of all this process's threads per step: the work, less the contention
        "decode_cpu_ms_per_step": round(statistics.median(r[2] for r in runs) * 1e3, 2),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "weight_bytes_per_step": need,
        "achieved_gb_s": round(need / step / 1e9, 2),
        "host_copy_gb_s_2threads": round(bw, 1),
        "fraction_of_bandwidth": round(need / step / 1e9 / bw, 3),
        "cpu_kernels": kernels.info() if eng.chunked_qmatmul else {"enabled": False},
        "embeddings_dtype": str(eng.params["language_model/in_out_embed"]["embeddings"].dtype),
        "threads_env": os.environ.get("GROKCTL_CPU_THREADS"),
        "backend": jax.default_backend(),
        "devices": len(mesh.devices.flat),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
