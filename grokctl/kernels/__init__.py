"""Native CPU kernels called from jitted code through `jax.ffi` (source: cpu_kernels.cc).

- `qmatmul(x, weight, scales, expert)`: x [M, K] f32|bf16 @ dequant(int8 [(E,) K, N], bf16 scales
  [(E,) G, N]) -> f32 [M, N] with exact weight values (int8 x scale, not rounded to bf16: the
  scale is applied once per group to the f32 sum of x . int8), f32 accumulation; weights
  streamed once and converted in registers (AVX-512 / AVX2 / scalar, chosen at run time),
  threaded over row slabs and columns.
- `qmatmul4(x, packed, scales, expert)`: the same for int4 weights packed two per byte (uint8
  [(E,) K/2, N]: row 2i in the low nibble, 2i+1 in the high), as the native format stores them;
  each weight is nibble x scale rounded to bf16 (the int4 format's value; with the 5-bit scales
  `quantize` writes the rounding is a no-op, and such a scale group is summed unscaled).
- `qmatmul_rows(x, weight, scales, experts)`: row a of x times expert experts[a]'s matrix
  (int8 or packed int4 [E, K(/2), N]): a MoE decode step's assignments in one call, rows that
  chose the same expert sharing one pass over its weights.
- `qmatmul_rows2(x, (w, s), (w, s), experts)`: the same for two weights of the same experts in
  one call (a MoE layer's gate and up projections: one thread-pool wake-up, one parallel loop).
- `qmatmul3(x, (w, s), (w, s), (w, s))`: three products of the same x in one call (attention's
  query, key and value projections).
- `attend(q, k_cache, v_cache, positions, valid, multiplier, softcap)`: the attention of new
  tokens q [B, T, H, K] over a cache of bf16 bits (uint16 [B, G, S, K]) with the reference's rounding points,
  reading only the keys the tokens may see (decode: O(position), not O(cache length)).
- `argmax(x, limit)`: the greedy pick of each row of the logits (first maximum among ids < limit).
- `matmul_nt_bf16(x, table)`: x [M, D] @ table[V, D]^T (bf16 table) -> f32 [M, V] (the logits).
- `matmul_nt_int8(x, table)`: x [M, D] @ table[V, D]^T (int8 table, exact as bf16) -> f32 [M, V]
  (the logits of an int8-per-row embedding table, before its row scales).

The shared library is built by `make install` (`python -m grokctl.kernels.build`) into
`grokctl/kernels/_build/`, or on first use into the user cache directory. Whenever it cannot be
built or loaded, or `GROKCTL_CPU_KERNELS=0`, `available()` is False and callers keep the pure-JAX
path: never an error for the user.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
BUILD_DIR = Path(__file__).with_name("_build")
QMATMUL_TARGET = "grokctl_qmatmul"
QMATMUL4_TARGET = "grokctl_qmatmul4"
QMATMUL_ROWS_TARGET = "grokctl_qmatmul_rows"
QMATMUL_ROWS2_TARGET = "grokctl_qmatmul_rows2"
ARGMAX_TARGET = "grokctl_argmax"
QMATMUL3_TARGET = "grokctl_qmatmul3"
MATMUL_NT_TARGET = "grokctl_matmul_nt_bf16"
MATMUL_NT_INT8_TARGET = "grokctl_matmul_nt_int8"
ATTEND_TARGET = "grokctl_attend"
# FFI target -> the handler symbol cpu_kernels.cc exports for it.
HANDLERS = {
    QMATMUL_TARGET: "GrokctlQMatmul",
    QMATMUL4_TARGET: "GrokctlQMatmul4",
    QMATMUL_ROWS_TARGET: "GrokctlQMatmulRows",
    QMATMUL_ROWS2_TARGET: "GrokctlQMatmulRows2",
    QMATMUL3_TARGET: "GrokctlQMatmul3",
    ARGMAX_TARGET: "GrokctlArgmax",
    MATMUL_NT_TARGET: "GrokctlMatmulNT",
    MATMUL_NT_INT8_TARGET: "GrokctlMatmulNTQ8",
    ATTEND_TARGET: "GrokctlAttend",
}
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx512_bf16", 4: "avx512_vnni", 5: "amx"}


def enabled_by_env() -> bool:
    """False when GROKCTL_CPU_KERNELS is 0/false/no/off (forces the pure-JAX path)."""
    return os.environ.get("GROKCTL_CPU_KERNELS", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def library_name() -> str:
    """File name keyed by the source and the jaxlib headers, so a stale build is never loaded."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(jax.ffi.include_dir().encode())
    return f"libgrokctl_cpu-{h.hexdigest()[:12]}.so"


def user_cache_dir() -> Path:
    root = os.environ.get("GROKCTL_CACHE_DIR") or Path.home() / ".cache" / "grokctl"
    return Path(root) / "kernels"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(dest_dir: Path = BUILD_DIR) -> Path:
    """Compile the library into `dest_dir` (written under a temporary name, then renamed).

    Per-ISA code is selected at run time (target attributes), so the library is safe on any
    x86-64 CPU; raises OSError / subprocess.CalledProcessError when it cannot be built.
    """
    cxx = compiler()
    if cxx is None:
        raise OSError("no C++ compiler (g++ / c++ / $CXX) found")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / library_name()
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=dest_dir)
    os.close(fd)
    cmd = [
        cxx,
        "-O3",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wno-maybe-uninitialized",
        "-Wno-uninitialized",
        "-isystem",
        jax.ffi.include_dir(),
        str(SOURCE),
        "-o",
        tmp,
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, out)
        for stale in dest_dir.glob("libgrokctl_cpu-*.so"):  # builds of older sources
            if stale != out:
                stale.unlink(missing_ok=True)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _find_or_build() -> Path | None:
    name = library_name()
    for d in (BUILD_DIR, user_cache_dir()):
        if (d / name).exists():
            return d / name
    for d in (BUILD_DIR, user_cache_dir()):  # lazily, where we may write
        try:
            return build(d)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            log.debug("grokctl CPU kernels: build into %s failed: %s", d, detail)
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Load and register the kernels once per process; None when unavailable."""
    try:
        path = _find_or_build()
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
        for target, symbol in HANDLERS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
            )
        return lib
    except Exception as exc:  # any failure means: use the pure-JAX path
        log.debug("grokctl CPU kernels unavailable: %s", exc)
        return None


def available() -> bool:
    """The kernels are built, loaded and not disabled by GROKCTL_CPU_KERNELS=0."""
    return enabled_by_env() and _library() is not None


def info() -> dict[str, Any]:
    """What the kernels would run with here: enabled, ISA, thread count, and how batch 1's
    int8-table logits are computed ("vnni": exact integer sums, or "f32"; GROKCTL_CPU_LOGITS)."""
    lib = _library() if enabled_by_env() else None
    if lib is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "isa": ISA_NAMES.get(lib.grokctl_cpu_isa(), "?"),
        "threads": int(lib.grokctl_cpu_threads()),
        "int8_logits": "vnni" if lib.grokctl_cpu_vnni_logits() else "f32",
    }


def _require() -> None:
    if _library() is None:
        raise RuntimeError("grokctl CPU kernels are not available (check kernels.available())")


def _call(
    target: str, shape: tuple[int, ...], *args: Any, dtype: Any = jnp.float32, **attrs: Any
) -> Any:
    """One FFI call of `target` returning an array of `shape` (the kernels must be available)."""
    _require()
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype))(*args, **attrs)


def qmatmul(x: jax.Array, weight: jax.Array, scales: jax.Array, expert: Any = 0) -> jax.Array:
    """x [M, K] (f32 or bf16) @ dequant(weight [(E,) K, N], scales [(E,) G, N]) -> f32 [M, N]."""
    e = jnp.asarray(expert, jnp.int32)
    return _call(QMATMUL_TARGET, (x.shape[0], weight.shape[-1]), x, weight, scales, e)  # type: ignore[no-any-return]


def qmatmul4(x: jax.Array, weight: jax.Array, scales: jax.Array, expert: Any = 0) -> jax.Array:
    """x [M, K] (f32 or bf16) @ dequant(packed int4 uint8 [(E,) K/2, N], scales [(E,) G, N])
    -> f32 [M, N]; packed row i holds rows 2i (low nibble) and 2i+1 (high); K/G even."""
    e = jnp.asarray(expert, jnp.int32)
    return _call(QMATMUL4_TARGET, (x.shape[0], weight.shape[-1]), x, weight, scales, e)  # type: ignore[no-any-return]


def qmatmul_rows(
    x: jax.Array, weight: jax.Array, scales: jax.Array, experts: jax.Array
) -> jax.Array:
    """Row a of x [A, K] (f32 or bf16) times expert experts[a]'s matrix of weight [E, K, N] int8
    (or packed int4 uint8 [E, K/2, N]) with scales [E, G, N] -> f32 [A, N], in one call."""
    idx = experts.astype(jnp.int32)
    return _call(QMATMUL_ROWS_TARGET, (x.shape[0], weight.shape[-1]), x, weight, scales, idx)  # type: ignore[no-any-return]


def qmatmul_rows2(
    x: jax.Array,
    first: tuple[jax.Array, jax.Array],
    second: tuple[jax.Array, jax.Array],
    experts: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """`qmatmul_rows` of x [A, K] with two (weight [E, K(/2), N_j], scales [E, G_j, N_j]) pairs
    of the same experts -> (f32 [A, N_0], f32 [A, N_1]), in one call."""
    _require()
    idx = experts.astype(jnp.int32)
    outs = tuple(
        jax.ShapeDtypeStruct((x.shape[0], w.shape[-1]), jnp.float32) for w, _ in (first, second)
    )
    y0, y1 = jax.ffi.ffi_call(QMATMUL_ROWS2_TARGET, outs)(x, *first, *second, idx)
    return y0, y1


def qmatmul3(x: jax.Array, *weights: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
    """x [M, K] @ three 2-D quantized weights ((weight, scales) pairs: int8 [K, N_j] or packed
    int4 uint8 [K/2, N_j], bf16 scales [G_j, N_j]) -> three f32 [M, N_j], in one call."""
    _require()
    if len(weights) != 3:
        raise ValueError("qmatmul3 takes exactly three (weight, scales) pairs")
    m = x.shape[0]
    outs = tuple(jax.ShapeDtypeStruct((m, w.shape[-1]), jnp.float32) for w, _ in weights)
    flat = [a for pair in weights for a in pair]
    return tuple(jax.ffi.ffi_call(QMATMUL3_TARGET, outs)(x, *flat))


def argmax(x: jax.Array, limit: int) -> jax.Array:
    """x [B, V] f32 -> int32 [B]: the first maximum of each row among ids < limit (a NaN counts as
    the maximum, as jnp.argmax)."""
    xf = x.astype(jnp.float32)
    return _call(ARGMAX_TARGET, (x.shape[0],), xf, dtype=jnp.int32, limit=np.int64(limit))  # type: ignore[no-any-return]


def matmul_nt_bf16(x: jax.Array, table: jax.Array) -> jax.Array:
    """x [M, D] (f32 or bf16) @ table[V, D]^T (bf16, or its bits as uint16) -> f32 [M, V]."""
    return _call(MATMUL_NT_TARGET, (x.shape[0], table.shape[0]), x, table)  # type: ignore[no-any-return]


def matmul_nt_int8(x: jax.Array, table: jax.Array) -> jax.Array:
    """x [M, D] (f32 or bf16) @ table[V, D]^T (int8) -> f32 [M, V]."""
    return _call(MATMUL_NT_INT8_TARGET, (x.shape[0], table.shape[0]), x, table)  # type: ignore[no-any-return]


def attend(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    multiplier: float,
    softcap: float,
) -> jax.Array:
    """q [B, T, H, K] (f32 or bf16) over caches [B, G, S, K] of bf16 bits (uint16) -> f32
    [B, T, H, K]: query head h reads kv head h // (H/G); key s is visible to token t when
    valid[b, s] and s <= positions[b, t] (int32 [B, T]); logits bf16-rounded, times
    `multiplier`, soft-capped at `softcap`, softmax weights rounded to bf16 (the reference's
    rounding points); a token with no visible key gets uniform weights over all S keys (the
    reference's masked softmax). Reads each (b, kv head)'s keys only up to its tokens' furthest
    position."""
    return _call(  # type: ignore[no-any-return]
        ATTEND_TARGET,
        q.shape,
        q,
        k_cache,
        v_cache,
        positions.astype(jnp.int32),
        valid.astype(jnp.bool_),
        multiplier=np.float32(multiplier),
        softcap=np.float32(softcap),
    )
