"""Benchmark cases in llama-bench's vocabulary, and the runner that times them on an engine.

A case is `pp<P>` (a prompt of P tokens, timed to the first sampled token on the host) or
`tg<N>` (N decode steps run as `generate` runs them: `decode_steps` steps per device call,
calls pipelined; a call's time, from the previous call's tokens reaching the host to its own,
shared equally by its steps), after a context of
`depth` tokens already in the KV cache, for `batch` rows and one MoE kernel. Every combination
of the given lists is a case. The depth is filled once per case, untimed; each repetition
starts from a copy of that cache. One untimed warm-up run per case compiles and warms the
programs; compile time is counted apart (`Engine.compile_seconds`).

With `routing=True` (`bench --routing-report`), after a case's timed repetitions one more,
untimed pass replays the exact tokens every repetition fed the model (the prompts of `pp`, the
first token and every sampled token fed back for `tg`) through the same engine with a routing
collection on (grokctl.routing.collect; its statistics variant of the forward program, compiled
once per shape). The timed repetitions run the plain programs, with no collection, and draw the
same random tokens as without the flag.

Shapes: B batch, P prompt tokens, N generated tokens, d depth, S cache length, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grokctl import hw, routing
from grokctl.config import ModelConfig, default
from grokctl.engine import Engine, bucket
from grokctl.errors import UsageError
from grokctl.model.cache import KVCache
from grokctl.sampling import RowSampling

MOE_KERNELS = ("sparse", "dense")
TG_WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "pp" or "tg"
    tokens: int  # P or N
    depth: int
    batch: int
    moe: str

    @property
    def test(self) -> str:
        return f"{self.kind}{self.tokens}"

    @property
    def label(self) -> str:
        return f"{self.test} @ d{self.depth}" if self.depth else self.test

    @property
    def key(self) -> tuple[str, int, int, str]:
        return (self.test, self.depth, self.batch, self.moe)

    @property
    def cache_len(self) -> int:
        return self.depth + self.tokens


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    prompts: tuple[int, ...] = (512,)
    gens: tuple[int, ...] = (128,)
    depths: tuple[int, ...] = (0,)
    batches: tuple[int, ...] = (1,)
    moes: tuple[str, ...] = ("sparse",)
    reps: int = 5
    decode_steps: int = default("decode_steps")  # tg: decode steps per device call


def parse_list(text: str | int, flag: str, minimum: int = 0) -> tuple[int, ...]:
    """'512' or '1,8,32' -> (1, 8, 32); anything else is a one-line usage error."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not re.fullmatch(r"-?\d+", t) for t in items):
        raise UsageError(f"{flag} {text!r}: expected a comma-separated list of integers")
    values = tuple(int(t) for t in items)
    low = [v for v in values if v < minimum]
    if low:
        raise UsageError(f"{flag} {text!r}: values must be >= {minimum}, got {low[0]}")
    return tuple(dict.fromkeys(values))


def parse_moe(text: str) -> tuple[str, ...]:
    kernels = tuple(dict.fromkeys(t.strip() for t in text.split(",")))
    bad = [k for k in kernels if k not in MOE_KERNELS]
    if bad:
        raise UsageError(f"--moe {text!r}: unknown kernel {bad[0]!r}; choose from sparse, dense")
    return kernels


def plan_cases(spec: BenchSpec, cfg: ModelConfig, data_axis: int) -> list[Case]:
    """Every combination, checked against the model's context and the mesh's data axis."""
    if spec.reps < 1:
        raise UsageError(f"-r {spec.reps}: repetitions must be >= 1")
    for b in spec.batches:
        if b < 1 or b % data_axis:
            raise UsageError(
                f"-b {b}: batch must be a positive multiple of the mesh's data axis ({data_axis})"
            )
    cases: list[Case] = []
    for moe in spec.moes:
        for b in spec.batches:
            for d in spec.depths:
                for kind, sizes in (("pp", spec.prompts), ("tg", spec.gens)):
                    cases.extend(Case(kind, n, d, b, moe) for n in sizes if n > 0)
    if not cases:
        raise UsageError("nothing to run: -p and -n are both 0")
    for c in cases:
        if c.cache_len > cfg.sequence_len:
            raise UsageError(
                f"-d {c.depth}: depth {c.depth} + {c.test} needs {c.cache_len} positions, "
                f"beyond the model's context of {cfg.sequence_len}"
            )
    return cases


def timed_decode(
    eng: Engine, tok: Any, cache: KVCache, rows: RowSampling, steps: int, k: int
) -> tuple[list[float], list[np.ndarray]]:
    """`steps` decode steps fed `tok` [B], run as `generate` runs them: k steps per device call
    (`Engine.decode_steps`; one `decode` and one `sample` call at k = 1), call c+1 dispatched,
    fed call c's last token on the device, before call c's tokens are fetched. Returns the
    seconds of each step (a call's time, from the previous call's tokens reaching the host —
    the first: from the start — to its own, shared equally by its steps) and each step's
    sampled tokens [B] on the host."""
    times: list[float] = []
    sampled: list[np.ndarray] = []
    flight: collections.deque[tuple[int, jax.Array]] = collections.deque()
    dispatched = 0
    last = time.perf_counter()
    while dispatched < steps or flight:
        while len(flight) < 2 and dispatched < steps:
            n = min(k, steps - dispatched)
            if k > 1:
                toks, tok, cache = eng.decode_steps(tok, cache, rows, dispatched, n, k)
            else:
                logits, cache = eng.decode(tok, cache)
                toks = tok = eng.sample(logits, rows, dispatched)
            flight.append((n, toks))
            dispatched += n
        n, toks = flight.popleft()
        host = eng.fetch(toks).reshape(-1, rows.seeds.shape[0])[:n]
        now = time.perf_counter()
        times.extend([(now - last) / n] * n)
        last = now
        sampled.extend(host)
    return times, sampled


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float] | None:
    if not seconds:
        return None
    return {f"p{q}": round(_pct(seconds, q) * 1e3, 3) for q in (50, 90, 99)}


@dataclasses.dataclass
class CaseResult:
    case: Case
    tok_s: list[float]  # one figure per repetition
    ttft_s: list[float]  # pp: prompt -> first sampled token on the host, per repetition
    token_s: list[float]  # tg: every decode step (token on the host), all repetitions
    compile_s: float
    fill_s: float  # untimed depth fill (one prefill of `depth` tokens)
    host_rss_peak: int
    device_mem_peak: int | None
    routing: routing.RoutingStats | None = None  # the timed repetitions' tokens, replayed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.tok_s)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.tok_s) if len(self.tok_s) > 1 else 0.0


OnRep = Callable[[Case, int, int], None]  # (case, repetition done, of)


class Runner:
    """Times cases on one engine per MoE kernel (sharing the loaded parameters).

    `routing`: after each case's timed repetitions, replay their tokens once more, untimed,
    with a routing collection on (CaseResult.routing; see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        seed: int = 0,
        routing: bool = False,
        decode_steps: int = default("decode_steps"),
    ):
        self.base = engine
        self.decode_steps = decode_steps
        self.cfg = engine.cfg
        self.engines: dict[str, Engine] = {engine.opts.moe_kernel: engine}
        self.rng = np.random.default_rng(seed)
        self.routing = routing
        self.host_rss_peak = hw.host_rss()
        self._copy = jax.jit(lambda c: jax.tree_util.tree_map(jnp.copy, c))

    def engine_for(self, moe: str) -> Engine:
        if moe not in self.engines:
            e = self.base
            self.engines[moe] = Engine(e.cfg, e.params, e.mesh, moe_kernel=moe)
        return self.engines[moe]

    def _tokens(self, batch: int, n: int) -> np.ndarray:
        return self.rng.integers(3, self.cfg.vocab_size, (batch, n)).astype(np.int32)

    def _rows(self, batch: int) -> RowSampling:
        """Greedy rows (bench's tokens are random; sampling settings do not change the cost)."""
        return RowSampling.of(np.arange(batch), vocab_limit=self.cfg.vocab_size)

    def _sample_rss(self) -> None:
        self.host_rss_peak = max(self.host_rss_peak, hw.host_rss())

    def _fill(self, eng: Engine, case: Case) -> KVCache:
        """A cache holding `depth` tokens (or empty), long enough for the case."""
        length = bucket(case.cache_len, self.cfg.sequence_len)
        cache = eng.new_cache(case.batch, length)
        if case.depth:
            lengths = np.full(case.batch, case.depth, np.int32)
            logits, cache = eng.prefill(self._tokens(case.batch, case.depth), lengths, cache)
            jax.block_until_ready(logits)
        return cache

    def _pp(self, eng: Engine, case: Case, cache: KVCache) -> tuple[float, np.ndarray]:
        """(seconds, the prompt [B, P] it fed)."""
        prompt = self._tokens(case.batch, case.tokens)
        lengths = np.full(case.batch, case.tokens, np.int32)
        start = time.perf_counter()
        logits, cache = eng.prefill(prompt, lengths, cache)
        eng.fetch(eng.sample(logits, self._rows(case.batch), 0))
        return time.perf_counter() - start, prompt

    def _tg(
        self, eng: Engine, case: Case, cache: KVCache, steps: int
    ) -> tuple[list[float], np.ndarray]:
        """(seconds of each step, the tokens [B, steps] fed to decode: the random first one,
        then each sampled token fed back; the last sampled one is never fed); see
        `timed_decode`."""
        tok = self._tokens(case.batch, 1)[:, 0]
        times, sampled = timed_decode(
            eng, tok, cache, self._rows(case.batch), steps, self.decode_steps
        )
        return times, np.stack([tok, *sampled][:steps], axis=1).astype(np.int32)

    def _routing_pass(
        self, eng: Engine, case: Case, filled: KVCache, fed: list[np.ndarray]
    ) -> routing.RoutingStats:
        """Untimed: every repetition's tokens again, from a copy of the same filled cache,
        through the engine with a routing collection on (random tokens may be the EOS id:
        counting never stops there)."""
        lengths = np.full(case.batch, case.tokens, np.int32)
        with routing.collect(eng, stop_at_eos=False) as rec:
            for tokens in fed:
                cache = self._copy(filled)
                if case.kind == "pp":
                    logits, cache = eng.prefill(tokens, lengths, cache)
                else:
                    for step in range(tokens.shape[1]):
                        logits, cache = eng.decode(tokens[:, step], cache)
                jax.block_until_ready(logits)
        return rec.stop()

    def run(self, case: Case, reps: int, on_rep: OnRep | None = None) -> CaseResult:
        eng = self.engine_for(case.moe)
        compile0 = eng.compile_seconds
        start = time.perf_counter()
        filled = self._fill(eng, case)
        fill_s = time.perf_counter() - start
        # Warm-up (compiles the prefill / decode / sample programs and the cache copy).
        if case.kind == "pp":
            self._pp(eng, case, self._copy(filled))
        else:
            self._tg(eng, case, self._copy(filled), min(case.tokens, TG_WARMUP_STEPS))
        tok_s, ttft, token = [], [], []
        fed: list[np.ndarray] = []  # each repetition's input tokens (for the routing pass)
        for rep in range(reps):
            cache = self._copy(filled)
            jax.block_until_ready(cache)
            if case.kind == "pp":
                elapsed, tokens = self._pp(eng, case, cache)
                ttft.append(elapsed)
            else:
                steps, tokens = self._tg(eng, case, cache, case.tokens)
                token.extend(steps)
                elapsed = sum(steps)
            tok_s.append(case.batch * case.tokens / elapsed)
            if self.routing:
                fed.append(tokens)
            self._sample_rss()
            if on_rep:
                on_rep(case, rep + 1, reps)
        compile_s = eng.compile_seconds - compile0  # the warm-up's (the reps reuse its programs)
        device_peak = hw.device_peak_memory(eng.mesh)
        stats = self._routing_pass(eng, case, filled, fed) if self.routing else None
        del filled
        return CaseResult(
            case,
            tok_s,
            ttft,
            token,
            compile_s,
            fill_s,
            self.host_rss_peak,
            device_peak,
            stats,
        )
