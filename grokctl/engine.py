"""The engine: jitted prefill and decode step over a donated KV cache, on a device mesh.

Shapes: B batch (padded to a multiple of the mesh's data axis), T prompt bucket, S cache
length, V vocab.

Only two programs are compiled per (B, T, S): `prefill` and `decode`. Prompt lengths are
bucketed (powers of two from 16) and cache lengths too, so compiled programs are reused; JAX's
persistent compilation cache keeps them across runs.

Routing statistics (`start_routing` / `stop_routing`, used by grokctl.routing.collect): while a
collection runs, prefill and decode run a variant of the same forward program that also adds
the step's RouterStats ([L, E] counts and masses, [L, E, E] co-activation) into a small
accumulator carried and donated like the cache; the variant is compiled once per shape and
kept. With no collection the programs are exactly the ones without statistics.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grokctl.config import ModelConfig, default
from grokctl.model import sharding as shd
from grokctl.model.cache import KVCache, cache_shapes
from grokctl.model.moe import RouterStats
from grokctl.model.quant import bf16_tables, chunked_qmatmul, cpu_kernels_enabled
from grokctl.model.transformer import ForwardOptions, ForwardOut, transformed
from grokctl.sampling import RowSampling, sample

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
        moe_kernel: str = default("moe"),
    ):
        self.cfg = cfg
        self.params = params
        self.mesh = mesh
        self.sizes = shd.mesh_shape(mesh)
        self.opts = ForwardOptions(moe_kernel=moe_kernel)  # routing outputs: per call, below
        self._apply = transformed(cfg, self.opts).apply
        # XLA:CPU materialises dequantized weights per call; chunking them is faster on one device.
        self.chunked_qmatmul = jax.default_backend() == "cpu" and mesh.devices.size == 1
        if cpu_kernels_enabled(self.chunked_qmatmul):  # native kernels stream a bf16 table
            self.params = bf16_tables(self.params)
        self._forward_jit = jax.jit(
            self._forward_impl,
            static_argnames=("all_logits", "routing", "first"),
            donate_argnums=(2, 5),  # the cache and the routing accumulator
        )
        self._applies: dict[ForwardOptions, Any] = {self.opts: self._apply}
        self._executables: dict[Any, Any] = {}
        self.compile_seconds = 0.0  # time spent compiling (or loading from the persistent cache)
        self.compile_count = 0  # programs compiled (or loaded from the persistent cache)
        self._routing_acc: RouterStats | None = None  # summed on the device while collecting
        self._routing_alive: jax.Array | None = None  # [B] bool: rows whose tokens count
        self._routing_stop_at_eos = True
        # Sampled tokens come back replicated: every process of a multi-host run can read them.
        self._sample = jax.jit(
            sample,
            static_argnames=("vocab_limit", "native_argmax"),
            out_shardings=shd.replicated(mesh),
        )
        self._native_argmax = cpu_kernels_enabled(self.chunked_qmatmul)
        self._decode_steps_jit = jax.jit(
            self._decode_steps_impl,
            static_argnames=("k", "vocab_limit"),
            donate_argnums=(2,),  # the cache
        )
        self._gather = jax.jit(lambda x: x, out_shardings=shd.replicated(mesh))
        self._decode_count_jit = jax.jit(_decode_count_step)

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
        tokens: jax.Array,  # [B, T], or [B] for one decode token
        cache: KVCache,
        last_index: jax.Array,  # [B]: row position whose logits are wanted (ignored if all)
        advance: jax.Array,  # [B]: real tokens per row (pads past them get overwritten later)
        acc: RouterStats | None = None,  # routing == "stats": the running sums (donated)
        count: jax.Array | None = None,  # routing == "stats": [B, T] bool tokens to count
        *,
        all_logits: bool,
        routing: str = "",  # "", "raw" (per-token probs/experts), "stats" (acc + step), both
        first: bool = False,  # logits of position 0 only, [B, V] (prefill's last / decode's one)
    ) -> ForwardOut:
        start = cache.pos
        if tokens.ndim == 1:  # decode: one token per row, made [B, 1] here (not a host dispatch)
            tokens = tokens[:, None]
        opts = dataclasses.replace(
            self.opts, with_routing="raw" in routing, routing_stats="stats" in routing
        )
        apply = self._applies.get(opts)
        if apply is None:
            apply = self._applies[opts] = transformed(self.cfg, opts).apply
        # A prompt's positions past its row's length (the bucket's padding) are computed by
        # attention only: no expert runs for them (their outputs are never read).
        live = None if all_logits else jnp.arange(tokens.shape[1])[None, :] < advance[:, None]
        with chunked_qmatmul(self.chunked_qmatmul):  # read at trace time
            out = apply(params, tokens, cache, None if all_logits else last_index, count, live)
        out.cache.pos = start + advance
        logits = out.logits[:, 0, :] if first else out.logits  # sliced in the program: no extra
        out = out._replace(logits=logits.astype(jnp.float32))  # dispatch per step on the host
        if acc is not None and out.routing is not None:
            rep = shd.replicated(self.mesh)  # small: every process can read it
            total = jax.tree.map(
                lambda a, s: jax.lax.with_sharding_constraint(a + s, rep), acc, out.routing
            )
            out = out._replace(routing=total)
        return out

    def abstract_cache(self, batch: int, length: int) -> KVCache:
        """The cache as ShapeDtypeStructs carrying this engine's shardings (no memory)."""
        return jax.tree_util.tree_map(  # type: ignore[no-any-return]
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            cache_shapes(self.cfg, batch, length),
            self.cache_sharding(batch, length),
        )

    def lower(self, kind: str, batch: int, length: int, tokens: int = 1) -> Any:
        """The forward program, lowered from shapes alone (jax.stages.Lowered): kind "prefill"
        (`tokens` prompt positions [B, T], last logits), "decode" (one token, [B, 1] logits) or
        "decode_steps" (`Engine.decode_steps` with k = `tokens`, greedy rows over the whole
        vocabulary), for `batch` rows and a cache of `length` positions. The same program
        `prefill`/`decode`/`decode_steps` run; `.as_text()`, `.compile()`,
        `.compile().memory_analysis()` inspect it."""
        if kind not in ("prefill", "decode", "decode_steps"):
            raise ValueError(f"unknown program kind {kind!r}: prefill, decode or decode_steps")

        def sds(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
            spec = self._spec(shape, shd.TOKENS[: len(shape)])
            return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec)

        rows = sds((batch,))
        cache = self.abstract_cache(batch, length)
        if kind == "decode_steps":
            sampling = RowSampling.of(np.zeros(batch), vocab_limit=self.cfg.vocab_size)
            scalar = np.int32(1)
            return self._decode_steps_jit.lower(
                self.params, rows, cache, rows, sampling.seeds, scalar, sampling.temperature,
                sampling.top_p, sampling.top_k, scalar, k=tokens,
                vocab_limit=sampling.vocab_limit,
            )  # fmt: skip
        return self._forward_jit.lower(
            self.params,
            rows if kind == "decode" else sds((batch, tokens)),
            cache,
            rows,
            rows,
            all_logits=(kind == "decode"),
            first=True,
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
            self.compile_count += 1
            self._executables[key] = exe
        return exe(*args)

    def _forward(
        self, *args: Any, all_logits: bool, routing: str = "", first: bool = False
    ) -> ForwardOut:
        static: dict[str, Any] = {"all_logits": all_logits}
        if first:
            static["first"] = True
        if routing:
            static["routing"] = routing
        return self._run("forward", self._forward_jit, args, skip=1, **static)  # type: ignore[no-any-return]

    def _forward_counted(
        self, *args: Any, count: Any, all_logits: bool, raw: bool = False, first: bool = False
    ) -> ForwardOut:
        """_forward, adding this step's routing statistics when a collection runs."""
        if self._routing_acc is None:
            routing = "raw" if raw else ""
            return self._forward(*args, all_logits=all_logits, routing=routing, first=first)
        mode = "raw+stats" if raw else "stats"
        out = self._forward(
            *args, self._routing_acc, count, all_logits=all_logits, routing=mode, first=first
        )
        self._routing_acc = out.routing
        return out

    def prefill(
        self, tokens: np.ndarray, lengths: np.ndarray, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Right-padded prompts [B, T] with true `lengths` [B] -> (last logits [B, V] f32, cache)."""
        lengths = np.asarray(lengths, np.int32)
        last, adv = self.put_tokens(np.maximum(lengths - 1, 0)), self.put_tokens(lengths)
        count = None
        if self._routing_acc is not None:  # positions inside each prompt; pad ids never count
            inside = np.arange(tokens.shape[1])[None, :] < lengths[:, None]  # [B, T]
            real = inside & (np.asarray(tokens) != self.cfg.pad_token)
            count = self.put_tokens(inside)
            self._routing_alive = self.put_tokens(real.any(axis=1))  # batch-padding rows: no
        out = self._forward_counted(
            self.params,
            self.put_tokens(tokens),
            cache,
            last,
            adv,
            count=count,
            all_logits=False,
            first=True,
        )
        return out.logits, out.cache

    def decode(self, tokens: np.ndarray | jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One new token per row [B] -> (logits [B, V] f32, cache)."""
        toks = tokens if isinstance(tokens, jax.Array) else self.put_tokens(np.asarray(tokens))
        ones = self._ones(toks.shape[0])
        count = None
        if self._routing_acc is not None:
            count = self._decode_count(toks)
        out = self._forward_counted(
            self.params, toks, cache, ones, ones, count=count, all_logits=True, first=True
        )
        return out.logits, out.cache

    def _ones(self, batch: int) -> jax.Array:
        if getattr(self, "_ones_cache", (None,))[0] != batch:
            self._ones_cache = (batch, self.put_tokens(np.ones(batch, np.int32)))
        return self._ones_cache[1]

    def forward_all(
        self, tokens: np.ndarray, cache: KVCache | None = None, raw_routing: bool = False
    ) -> ForwardOut:
        """Full forward of [B, T] tokens from an empty cache of length T: logits [B, T, V] f32.
        `raw_routing`: also every token's router probs [L, B, T, E] and experts [L, B, T, k]."""
        b, t = tokens.shape
        cache = cache if cache is not None else self.new_cache(b, t)
        adv = self.put_tokens(np.full(b, t, np.int32))
        args = (self.params, self.put_tokens(tokens), cache, adv, adv)
        # While collecting, every non-pad id counts.
        return self._forward_counted(*args, count=None, all_logits=True, raw=raw_routing)

    # --- routing statistics ----------------------------------------------------------------
    def start_routing(self, stop_at_eos: bool = True) -> None:
        """Sum RouterStats over every prefill/decode/forward_all token from now on (pad ids,
        batch-padding rows and, with `stop_at_eos`, a row's tokens from its EOS on excluded)."""
        cfg, rep = self.cfg, shd.replicated(self.mesh)
        zeros = jax.jit(
            lambda: RouterStats.zeros(cfg.num_layers, cfg.num_experts), out_shardings=rep
        )
        self._routing_acc = self._run("routing-zeros", zeros, ())
        self._routing_alive = None
        self._routing_stop_at_eos = stop_at_eos

    def stop_routing(self) -> RouterStats:
        """End the collection: the sums as numpy arrays (on every process)."""
        if self._routing_acc is None:
            raise RuntimeError("no routing collection is running (call start_routing first)")
        acc, self._routing_acc, self._routing_alive = self._routing_acc, None, None
        return jax.tree.map(self.fetch, acc)  # type: ignore[no-any-return]

    @property
    def collecting_routing(self) -> bool:
        return self._routing_acc is not None

    def _decode_count(self, toks: jax.Array) -> jax.Array:
        """[B, 1] bool: rows still counted for this decode step; updates the alive rows."""
        b = toks.shape[0]
        alive = self._routing_alive
        if alive is None or alive.shape[0] != b:
            alive = self.put_tokens(np.ones(b, bool))
        eos = np.int32(self.cfg.eos_token if self._routing_stop_at_eos else -1)
        args = (toks, alive, eos)
        count, self._routing_alive = self._run("routing-count", self._decode_count_jit, args)
        return count  # type: ignore[no-any-return]

    def fetch(self, x: Any) -> np.ndarray:
        """A device array as numpy on this process, gathering shards other processes hold."""
        if not x.is_fully_addressable and not x.is_fully_replicated:
            x = self._gather(x)
        return np.asarray(x)

    def sample(self, logits: jax.Array, rows: RowSampling, step: int) -> jax.Array:
        """One token per row [B] (replicated) from logits [B, V], the key of `step`."""
        # numpy arguments (not single-device arrays): identical on every process, they enter
        # the program replicated, as a multi-process jit requires.
        args = (
            logits,
            rows.seeds,
            np.asarray(step, np.int32),
            rows.temperature,
            rows.top_p,
            rows.top_k,
        )
        return self._run(
            "sample",
            self._sample,
            args,
            vocab_limit=rows.vocab_limit,
            native_argmax=self._native_argmax,
        )  # type: ignore[no-any-return]

    # --- several decode steps in one program -------------------------------------------------
    def _decode_steps_impl(
        self,
        params: Any,
        tokens: jax.Array,  # [B]: fed to the first step
        cache: KVCache,
        ones: jax.Array,  # [B] int32 ones
        seeds: jax.Array,
        step: jax.Array,  # the first step's sampling key
        temperature: jax.Array,
        top_p: jax.Array,
        top_k: jax.Array,
        n: jax.Array,  # steps to run, 1..k
        *,
        k: int,
        vocab_limit: int,
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        rep = shd.replicated(self.mesh)

        def one(i: jax.Array, carry: tuple[jax.Array, KVCache, jax.Array]) -> Any:
            tok, cache, toks = carry
            # Tied to the step index, the weights look loop-variant: XLA would otherwise move
            # work on them out of the loop (XLA's paths dequantize weights in the step; on
            # XLA:CPU a bf16 gather widens its table) and run it for every weight at once.
            inside, _ = jax.lax.optimization_barrier((params, i))
            out = self._forward_impl(inside, tok, cache, ones, ones, all_logits=True, first=True)
            new = sample(
                out.logits, seeds, step + i, temperature, top_p, top_k, vocab_limit,
                native_argmax=self._native_argmax,
            )  # fmt: skip
            new = jax.lax.with_sharding_constraint(new, rep)
            return new, out.cache, toks.at[i].set(new)

        toks = jax.lax.with_sharding_constraint(jnp.zeros((k, tokens.shape[0]), jnp.int32), rep)
        last, cache, toks = jax.lax.fori_loop(0, n, one, (tokens, cache, toks))
        return toks, last, cache

    def decode_steps(
        self,
        tokens: np.ndarray | jax.Array,
        cache: KVCache,
        rows: RowSampling,
        step: int,
        n: int,
        k: int,
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        """`n` decode steps (1 <= n <= k) in one program, each feeding the token it samples
        (the key of `step`, `step + 1`, ...) to the next: (tokens [k, B] replicated, of which the
        first n rows are the steps' tokens, the last of them [B], cache). The same tokens as n
        `decode` + `sample` calls, for one dispatch instead of 2n: the host's cost of a call
        (~1 ms for bench-l2's 176 arguments, paid on the CPUs that compute; docs/PERFORMANCE.md)
        is shared by n tokens. One program per k, whatever n; no routing collection."""
        if not 1 <= n <= k:
            raise ValueError(f"decode_steps: n must be in 1..{k}, got {n}")
        if self._routing_acc is not None:
            raise RuntimeError("decode_steps does not count routing: decode one step at a time")
        toks = tokens if isinstance(tokens, jax.Array) else self.put_tokens(np.asarray(tokens))
        args = (
            self.params,
            toks,
            cache,
            self._ones(toks.shape[0]),
            rows.seeds,
            np.asarray(step, np.int32),
            rows.temperature,
            rows.top_p,
            rows.top_k,
            np.asarray(n, np.int32),
        )
        return self._run(  # type: ignore[no-any-return]
            "decode-steps", self._decode_steps_jit, args, skip=1, k=k,
            vocab_limit=rows.vocab_limit,
        )  # fmt: skip


def _decode_count_step(
    tokens: jax.Array, alive: jax.Array, eos: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """tokens [B], alive [B] bool -> (count [B, 1], alive): the EOS fed back ends its row."""
    keep = alive & (tokens != eos)
    return keep[:, None], keep
