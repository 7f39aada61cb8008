"""The engine: jitted prefill and decode step over a donated KV cache, on a device mesh.

Shapes: B batch (padded to a multiple of the mesh's data axis), T prompt bucket, S cache
length, V vocab.

Only two programs are compiled per (B, T, S): `prefill` and `decode`. Prompt lengths are
bucketed (powers of two from 16) and cache lengths too, so compiled programs are reused; JAX's
persistent compilation cache keeps them across runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grokctl.config import ModelConfig
from grokctl.model import sharding as shd
from grokctl.model.cache import KVCache, cache_shapes
from grokctl.model.quant import chunked_qmatmul
from grokctl.model.transformer import ForwardOptions, ForwardOut, transformed
from grokctl.sampling import sample

MIN_BUCKET = 16


def bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET), capped at `cap`."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, cap)


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> None:
    """JAX's persistent compilation cache (GROKCTL_CACHE_DIR, default ~/.cache/grokctl/jax)."""
    if path is None:
        path = os.environ.get("GROKCTL_CACHE_DIR") or Path.home() / ".cache" / "grokctl" / "jax"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except (OSError, AttributeError):  # read-only home or an older jax: run uncached
        pass


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        params: Any,
        mesh: Mesh,
        moe_kernel: str = "sparse",
        with_routing: bool = False,
    ):
        self.cfg = cfg
        self.params = params
        self.mesh = mesh
        self.sizes = shd.mesh_shape(mesh)
        self.opts = ForwardOptions(moe_kernel=moe_kernel, with_routing=with_routing)
        self._apply = transformed(cfg, self.opts).apply
        # XLA:CPU materialises dequantized weights per call; chunking them is faster on one device.
        self.chunked_qmatmul = jax.default_backend() == "cpu" and mesh.devices.size == 1
        self._forward_jit = jax.jit(
            self._forward_impl, static_argnames=("all_logits",), donate_argnums=(2,)
        )
        self._executables: dict[Any, Any] = {}
        self.compile_seconds = 0.0  # time spent compiling (or loading from the persistent cache)
        # Sampled tokens come back replicated: every process of a multi-host run can read them.
        self._sample = jax.jit(
            sample, static_argnames=("vocab_limit",), out_shardings=shd.replicated(mesh)
        )
        self._gather = jax.jit(lambda x: x, out_shardings=shd.replicated(mesh))

    # --- placement -----------------------------------------------------------------------
    def padded_batch(self, batch: int) -> int:
        d = self.sizes[shd.DATA]
        return -(-batch // d) * d

    def _spec(self, shape: tuple[int, ...], spec: tuple[str | None, ...]) -> Any:
        return shd.named(self.mesh, shd.fit_spec(shape, spec, self.sizes))

    def cache_sharding(self, batch: int, length: int) -> KVCache:
        shapes = cache_shapes(self.cfg, batch, length)
        kv = self._spec(shapes.k[0].shape, shd.CACHE_KV)
        return KVCache(
            k=(kv,) * self.cfg.num_layers,
            v=(kv,) * self.cfg.num_layers,
            pos=self._spec((batch,), shd.CACHE_POS),
            valid=self._spec((batch, length), shd.CACHE_VALID),
        )

    def new_cache(self, batch: int, length: int) -> KVCache:
        shapes = cache_shapes(self.cfg, batch, length)
        make = jax.jit(
            lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
            out_shardings=self.cache_sharding(batch, length),
        )
        return self._run(f"cache{batch}x{length}", make, ())  # type: ignore[no-any-return]

    def put_tokens(self, tokens: np.ndarray) -> jax.Array:
        tokens = np.asarray(tokens, np.int32)
        spec = shd.TOKENS[: tokens.ndim]
        return jax.device_put(tokens, self._spec(tokens.shape, spec))

    # --- compiled programs ---------------------------------------------------------------
    def _forward_impl(
        self,
        params: Any,
        tokens: jax.Array,  # [B, T]
        cache: KVCache,
        last_index: jax.Array,  # [B]: row position whose logits are wanted (ignored if all)
        advance: jax.Array,  # [B]: real tokens per row (pads past them get overwritten later)
        *,
        all_logits: bool,
    ) -> ForwardOut:
        start = cache.pos
        with chunked_qmatmul(self.chunked_qmatmul):  # read at trace time
            out = self._apply(params, tokens, cache, None if all_logits else last_index)
        out.cache.pos = start + advance
        return out._replace(logits=out.logits.astype(jnp.float32))

    def abstract_cache(self, batch: int, length: int) -> KVCache:
        """The cache as ShapeDtypeStructs carrying this engine's shardings (no memory)."""
        return jax.tree_util.tree_map(  # type: ignore[no-any-return]
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            cache_shapes(self.cfg, batch, length),
            self.cache_sharding(batch, length),
        )

    def lower(self, kind: str, batch: int, length: int, tokens: int = 1) -> Any:
        """The forward program, lowered from shapes alone (jax.stages.Lowered): kind "prefill"
        (`tokens` prompt positions [B, T], last logits) or "decode" (one token, [B, 1] logits),
        for `batch` rows and a cache of `length` positions. The same program `prefill`/`decode`
        run; `.as_text()`, `.compile()`, `.compile().memory_analysis()` inspect it."""
        if kind not in ("prefill", "decode"):
            raise ValueError(f"unknown program kind {kind!r}: prefill or decode")
        t = 1 if kind == "decode" else tokens

        def sds(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
            spec = self._spec(shape, shd.TOKENS[: len(shape)])
            return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec)

        rows = sds((batch,))
        cache = self.abstract_cache(batch, length)
        return self._forward_jit.lower(
            self.params, sds((batch, t)), cache, rows, rows, all_logits=(kind == "decode")
        )

    def compiled(self, kind: str, batch: int, length: int, tokens: int = 1) -> Any:
        """`lower(...)` compiled (jax.stages.Compiled), once per signature; the time counts
        in `compile_seconds`."""
        key = ("lowered", kind, batch, length, 1 if kind == "decode" else tokens)
        exe = self._executables.get(key)
        if exe is None:
            start = time.perf_counter()
            exe = self.lower(kind, batch, length, tokens).compile()
            self.compile_seconds += time.perf_counter() - start
            self._executables[key] = exe
        return exe

    @property
    def programs(self) -> int:
        """How many programs this engine has compiled so far (a recompilation shows here)."""
        return len(self._executables)

    def _run(
        self, name: str, jitted: Any, args: tuple[Any, ...], skip: int = 0, **static: Any
    ) -> Any:
        """Run `jitted`, compiled ahead of time once per input signature, so that compile time
        (`compile_seconds`) is measured apart from run time. `skip` leading args (the params)
        do not change between calls and are left out of the key."""
        leaves = jax.tree_util.tree_leaves(args[skip:])
        key = (
            name,
            *sorted(static.items()),
            *(
                (np.shape(a), getattr(a, "dtype", type(a)), getattr(a, "sharding", None))
                for a in leaves
            ),
        )
        exe = self._executables.get(key)
        if exe is None:
            start = time.perf_counter()
            exe = jitted.lower(*args, **static).compile()
            self.compile_seconds += time.perf_counter() - start
            self._executables[key] = exe
        return exe(*args)

    def _forward(self, *args: Any, all_logits: bool) -> ForwardOut:
        return self._run("forward", self._forward_jit, args, skip=1, all_logits=all_logits)  # type: ignore[no-any-return]

    def prefill(
        self, tokens: np.ndarray, lengths: np.ndarray, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Right-padded prompts [B, T] with true `lengths` [B] -> (last logits [B, V] f32, cache)."""
        lengths = np.asarray(lengths, np.int32)
        last, adv = self.put_tokens(np.maximum(lengths - 1, 0)), self.put_tokens(lengths)
        out = self._forward(
            self.params, self.put_tokens(tokens), cache, last, adv, all_logits=False
        )
        return out.logits[:, 0, :], out.cache

    def decode(self, tokens: np.ndarray | jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One new token per row [B] -> (logits [B, V] f32, cache)."""
        toks = tokens if isinstance(tokens, jax.Array) else self.put_tokens(np.asarray(tokens))
        ones = self._ones(toks.shape[0])
        out = self._forward(self.params, toks[:, None], cache, ones, ones, all_logits=True)
        return out.logits[:, 0, :], out.cache

    def _ones(self, batch: int) -> jax.Array:
        if getattr(self, "_ones_cache", (None,))[0] != batch:
            self._ones_cache = (batch, self.put_tokens(np.ones(batch, np.int32)))
        return self._ones_cache[1]

    def forward_all(self, tokens: np.ndarray, cache: KVCache | None = None) -> ForwardOut:
        """Full forward of [B, T] tokens from an empty cache of length T: logits [B, T, V] f32."""
        b, t = tokens.shape
        cache = cache if cache is not None else self.new_cache(b, t)
        adv = self.put_tokens(np.full(b, t, np.int32))
        return self._forward(self.params, self.put_tokens(tokens), cache, adv, adv, all_logits=True)

    def fetch(self, x: Any) -> np.ndarray:
        """A device array as numpy on this process, gathering shards other processes hold."""
        if not x.is_fully_addressable and not x.is_fully_replicated:
            x = self._gather(x)
        return np.asarray(x)

    def sample(
        self,
        logits: jax.Array,
        row_seeds: np.ndarray,
        step: int,
        temperature: np.ndarray,
        top_p: np.ndarray,
        top_k: np.ndarray,
        vocab_limit: int,
    ) -> jax.Array:
        # numpy arguments (not single-device arrays): identical on every process, they enter
        # the program replicated, as a multi-process jit requires.
        args = (
            logits,
            np.asarray(row_seeds, np.int32),
            np.asarray(step, np.int32),
            np.asarray(temperature, np.float32),
            np.asarray(top_p, np.float32),
            np.asarray(top_k, np.int32),
        )
        return self._run("sample", self._sample, args, vocab_limit=int(vocab_limit))  # type: ignore[no-any-return]
