"""Batched generation: prefill once, decode step by step, stop per prompt.

Each prompt gets its own tokens, finish reason and counts; prompts run as one batch (right-
padded to a bucket), and a prompt's tokens do not depend on the batch it runs in.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from grokctl.config import SETTINGS, ModelConfig, default
from grokctl.engine import Engine, bucket
from grokctl.errors import UsageError
from grokctl.sampling import RowSampling, adjust_logits, row_seed, top_logprobs

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"  # --max-tokens reached
FINISH_CONTEXT = "context"  # the context window is full
FINISH_INTERRUPTED = "interrupted"  # Ctrl-C: the tokens so far


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen; defaults and ranges are those of `grokctl.config.SETTINGS`."""

    max_tokens: int = default("max_tokens")
    temperature: float = default("temperature")
    top_p: float = default("top_p")
    top_k: int = default("top_k")
    seed: int = default("seed")
    stop: tuple[str, ...] = default("stop")
    stop_at_eos: bool = True
    min_p: float = default("min_p")
    repeat_penalty: float = default("repeat_penalty")
    repeat_last_n: int = default("repeat_last_n")
    logprobs: int = default("logprobs")
    decode_steps: int = default("decode_steps")  # per device call; the tokens do not change

    def validate(self) -> SamplingParams:
        for name in (
            "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
            "repeat_last_n", "logprobs", "decode_steps",
        ):  # fmt: skip
            value = getattr(self, name)
            if (problem := SETTINGS[name].problem(value)) is not None:
                raise UsageError(f"--{name.replace('_', '-')}: {problem}, got {value!r}")
        return self

    @property
    def adjusts_logits(self) -> bool:
        return self.min_p > 0 or (self.repeat_penalty != 1 and self.repeat_last_n > 0)


@dataclasses.dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    text: str | None = None
    prompt: str | None = None
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    compile_seconds: float = 0.0
    # With logprobs=N: per generated token {"token_id", "logprob", "top": [{"token_id", "logprob"}]}
    logprobs: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_token_ids),
            "generated_tokens": len(self.token_ids),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "compile_seconds": round(self.compile_seconds, 3),
        }
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


Decoder = Callable[[list[int]], str]
OnToken = Callable[[int, int], None]  # (row, token id)


def _stop_cut(text: str, stops: Sequence[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]]) -> None:
    """Refuse empty prompts, ids outside the vocabulary and prompts that fill the context
    (never truncated silently); cheap, so callers run it before loading weights."""
    if not prompts:
        raise UsageError("no prompt given")
    ctx = cfg.sequence_len
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UsageError(f"prompt {i} is empty")
        if len(p) >= ctx:
            raise UsageError(
                f"prompt {i} has {len(p)} tokens; the context holds {ctx} (prompt + at least one "
                "new token): shorten it, it is never truncated silently"
            )
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UsageError(
                f"prompt {i}: token id {bad[0]} outside the vocabulary 0..{cfg.vocab_size - 1}"
            )


def context_warning(
    cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_tokens: int
) -> str | None:
    """A warning when `max_tokens` cannot be reached by the longest prompt (the context is full
    first, finish reason "context"); None when every prompt has room."""
    longest = max((len(p) for p in prompts), default=0)
    room = cfg.sequence_len - longest
    if max_tokens <= room:
        return None
    return (
        f"--max-tokens {max_tokens} exceeds what the context allows: the longest prompt has "
        f"{longest} tokens of {cfg.sequence_len}, so at most {room} new tokens (finish: context)"
    )


_adjust = jax.jit(adjust_logits)
_top_logprobs = jax.jit(top_logprobs, static_argnames=("n", "vocab_limit"))


class _Rows:
    """Per-row state of one batch: tokens so far, finish reasons, recent-token windows."""

    def __init__(self, prompts: Sequence[Sequence[int]], params: SamplingParams, b: int):
        self.prompts = [list(p) for p in prompts]
        self.n = len(prompts)
        self.b = b
        self.params = params
        self.out: list[list[int]] = [[] for _ in range(self.n)]
        self.finish: list[str | None] = [None] * self.n
        self.texts: list[str | None] = [None] * self.n
        self.logprobs: list[list[dict[str, Any]]] | None = (
            [[] for _ in range(self.n)] if params.logprobs else None
        )

    def recent(self) -> np.ndarray:
        """[B, W] the last W tokens of each row (prompt, then output), -1 padded."""
        w = self.params.repeat_last_n
        window = np.full((self.b, w), -1, np.int32)
        for i in range(self.n):
            hist = (self.prompts[i] + self.out[i])[-w:] if w else []
            window[i, : len(hist)] = hist
        return window

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def interrupt(self) -> None:
        self.finish = [f or FINISH_INTERRUPTED for f in self.finish]


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    decode_text: Decoder | None = None,
    vocab_limit: int | None = None,
    on_token: OnToken | None = None,
) -> list[Completion]:
    """Generate for a batch of prompts. Ctrl-C (KeyboardInterrupt) during generation is not
    raised: every unfinished row ends with finish reason "interrupted" and its tokens so far."""
    params.validate()
    if params.stop and decode_text is None:
        raise UsageError(
            "--stop needs a tokenizer to compare text (not available with --token-ids alone)"
        )
    check_prompts(engine.cfg, prompts)
    batch = _Batch.of(engine, prompts, params, vocab_limit)
    rows = _Rows(prompts, params, batch.b)
    timing = _decode_loop(engine, batch, rows, decode_text, on_token)
    return _completions(prompts, rows, batch, timing, decode_text)


@dataclasses.dataclass
class _Batch:
    """The prompts right-padded into one batch of `b` rows (the engine's batch padding), the
    cache length, and each row's sampling parameters as arrays."""

    n: int  # prompts
    b: int  # rows, padded
    tokens: np.ndarray  # [b, T bucket] int32
    lengths: np.ndarray  # [b] prompt lengths (1 for padding rows)
    cache_len: int
    sampling: RowSampling
    repeat_penalty: np.ndarray
    min_p: np.ndarray

    @classmethod
    def of(
        cls,
        engine: Engine,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        vocab_limit: int | None,
    ) -> _Batch:
        cfg = engine.cfg
        n = len(prompts)
        b = engine.padded_batch(n)
        lengths = np.array([len(p) for p in prompts] + [1] * (b - n), np.int32)
        longest = int(lengths.max())
        tokens = np.zeros((b, bucket(longest, cfg.sequence_len)), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        seen: Counter[tuple[int, ...]] = Counter()
        seeds = []
        for p in prompts:  # a repeated prompt gets its own seed, the same in any batch
            seeds.append(row_seed(params.seed, list(p), seen[tuple(p)]))
            seen[tuple(p)] += 1
        seeds += [0] * (b - n)

        def full(value: float, dtype: Any) -> np.ndarray:
            return np.full(b, value, dtype)

        return cls(
            n=n,
            b=b,
            tokens=tokens,
            lengths=lengths,
            cache_len=bucket(longest + params.max_tokens, cfg.sequence_len),
            sampling=RowSampling.of(
                seeds,
                params.temperature,
                params.top_p,
                params.top_k,
                vocab_limit=min(vocab_limit or cfg.vocab_size, cfg.vocab_size),
            ),
            repeat_penalty=full(params.repeat_penalty, np.float32),
            min_p=full(params.min_p, np.float32),
        )


def _pick(engine: Engine, batch: _Batch, rows: _Rows, logits: jax.Array, step: int) -> jax.Array:
    """Sample one token per row, on the device (dispatched, not waited for)."""
    adjusted = logits
    if rows.params.adjusts_logits:  # through the engine: its compile time is counted apart
        window = rows.recent()
        adjusted = engine._run(
            "adjust", _adjust, (logits, window, batch.repeat_penalty, batch.min_p)
        )
    return engine.sample(adjusted, batch.sampling, step)


def _record(
    engine: Engine, batch: _Batch, rows: _Rows, logits: jax.Array, tok: jax.Array
) -> np.ndarray:
    """The sampled tokens on the host (waits for them); with `logprobs`, record the top-N
    log-probabilities of each unfinished row's token."""
    params = rows.params
    host = np.asarray(jax.device_get(tok))
    if rows.logprobs is not None:
        lp = engine._run(
            "logprobs", _top_logprobs, (logits, tok), n=params.logprobs,
            vocab_limit=batch.sampling.vocab_limit,
        )  # fmt: skip
        chosen, ids, top = (engine.fetch(x) for x in lp)
        for i in range(rows.n):
            if rows.finish[i] is None:
                rows.logprobs[i].append(
                    {
                        "token_id": int(host[i]),
                        "logprob": round(float(chosen[i]), 5),
                        "top": [
                            {"token_id": int(t), "logprob": round(float(v), 5)}
                            for t, v in zip(ids[i], top[i])
                        ],
                    }
                )
    return host


@dataclasses.dataclass
class _Timing:
    prefill_s: float = 0.0  # without compilation
    decode_s: float = 0.0
    compile_s: float = 0.0
    steps: int = 0  # decode steps run


@dataclasses.dataclass
class _Call:
    """One dispatched decode call of `n` steps, on the device: their tokens (`tokens`: [k, B],
    the first n rows, from `Engine.decode_steps`; [B] from a one-step call), the last of them
    `last` [B], and a one-step call's `logits` [B, V] (for logprobs)."""

    n: int
    tokens: jax.Array
    last: jax.Array
    logits: jax.Array | None = None


def _decode_loop(
    engine: Engine,
    batch: _Batch,
    rows: _Rows,
    decode_text: Decoder | None,
    on_token: OnToken | None,
) -> _Timing:
    """Prefill, then decode until every row has finished (or the cache is full, or Ctrl-C);
    compile time is measured apart from prefill and decode time.

    When sampling needs nothing from the host (no repeat penalty / min-p window, no logprobs, no
    routing collection) a device call runs up to `decode_steps` steps (`Engine.decode_steps`:
    each step samples on the device and feeds its token to the next) and the host receives the
    tokens in groups; otherwise each call is one decode step and one sampler call. Calls are
    pipelined: call c+1, fed call c's last token on the device, is dispatched before call c's
    tokens are fetched, so the host's work (the dispatch, the tokens' trip, on_token) overlaps
    the device's. No call runs past what a row can still take (max tokens, its context, the
    cache); tokens computed past a row's end (EOS, a stop string) are discarded: the same tokens
    as one step at a time. Not pipelined: repeat penalty / min-p (their window needs the last
    token on the host) and routing collections (an extra step would count)."""
    timing = _Timing()
    compile0 = compile1 = engine.compile_seconds
    cfg, params = engine.cfg, rows.params
    plain = not params.adjusts_logits and not engine.collecting_routing
    per_call = params.decode_steps if plain and rows.logprobs is None else 1
    depth = 2 if plain else 1  # calls in flight, counting the one waited for
    cache_room = batch.cache_len - int(batch.lengths.max()) - 1  # decode steps the cache holds

    def call(tok: jax.Array, cache: Any, first: int, n: int) -> tuple[_Call, Any]:
        """Dispatch decode steps first..first+n-1 (their sampling keys), fed `tok`."""
        if per_call > 1:
            toks, last, cache = engine.decode_steps(tok, cache, batch.sampling, first, n, per_call)
            return _Call(n, toks, last), cache
        logits, cache = engine.decode(tok, cache)
        picked = _pick(engine, batch, rows, logits, first)
        return _Call(1, picked, picked, logits), cache

    def received(c: _Call) -> np.ndarray:
        """The call's tokens [n, B] on the host (waits for them; records logprobs)."""
        if c.logits is not None:
            return _record(engine, batch, rows, c.logits, c.tokens)[None]
        return engine.fetch(c.tokens)[: c.n]

    t0 = time.perf_counter()
    try:
        cache = engine.new_cache(batch.b, batch.cache_len)
        logits, cache = engine.prefill(batch.tokens, batch.lengths, cache)
        tok = _pick(engine, batch, rows, logits, 0)
        host_tok = _record(engine, batch, rows, logits, tok)
        timing.prefill_s = time.perf_counter() - t0 - (engine.compile_seconds - compile0)
        compile1 = engine.compile_seconds
        t1 = time.perf_counter()
        _accept(rows, host_tok, batch.lengths, cfg, decode_text, on_token)
        flight: collections.deque[_Call] = collections.deque()
        dispatched = 0  # decode steps
        while not rows.done:
            ahead = sum(c.n for c in flight)
            while len(flight) < depth:
                n = min(per_call, _room(rows, batch.lengths, cfg) - ahead, cache_room - dispatched)
                if n <= 0:
                    break
                c, cache = call(tok, cache, dispatched + 1, n)
                flight.append(c)
                tok, dispatched, ahead = c.last, dispatched + n, ahead + n
            if not flight:  # rows left, no step left: the cache is full for the longest
                rows.finish = [f or FINISH_CONTEXT for f in rows.finish]
                break
            c = flight.popleft()
            host = received(c)
            timing.steps += c.n
            for step_tokens in host:
                _accept(rows, step_tokens, batch.lengths, cfg, decode_text, on_token)
                if rows.done:
                    break
        timing.decode_s = time.perf_counter() - t1 - (engine.compile_seconds - compile1)
    except KeyboardInterrupt:
        rows.interrupt()
    timing.compile_s = engine.compile_seconds - compile0
    return timing


def _room(rows: _Rows, lengths: np.ndarray, cfg: ModelConfig) -> int:
    """The most tokens an unfinished row can still take (max tokens, its context): decode steps
    still worth dispatching."""
    limit = rows.params.max_tokens
    return max(
        (
            min(limit, cfg.sequence_len - int(lengths[i])) - len(rows.out[i])
            for i in range(rows.n)
            if rows.finish[i] is None
        ),
        default=0,
    )


def _completions(
    prompts: Sequence[Sequence[int]],
    rows: _Rows,
    batch: _Batch,
    timing: _Timing,
    decode_text: Decoder | None,
) -> list[Completion]:
    """One Completion per prompt: its tokens, text (cut at a stop string), finish reason, rates."""
    n = batch.n
    prefill_rate = (
        float(batch.lengths[:n].sum()) / timing.prefill_s if timing.prefill_s > 0 else 0.0
    )
    decode_rate = (
        (timing.steps * n) / timing.decode_s if timing.decode_s > 0 and timing.steps else 0.0
    )
    results = []
    for i, p in enumerate(prompts):
        text: str | None = rows.texts[i]
        if text is None and decode_text is not None:
            text = decode_text(rows.out[i])
        logprobs = rows.logprobs[i][: len(rows.out[i])] if rows.logprobs is not None else None
        results.append(
            Completion(
                prompt_token_ids=list(p),
                token_ids=rows.out[i],
                finish_reason=rows.finish[i] or FINISH_LENGTH,
                text=text,
                prefill_tokens_per_s=prefill_rate,
                decode_tokens_per_s=decode_rate,
                compile_seconds=timing.compile_s,
                logprobs=logprobs,
            )
        )
    return results


def _accept(
    rows: _Rows,
    host_tok: np.ndarray,
    lengths: np.ndarray,
    cfg: ModelConfig,
    decode_text: Decoder | None,
    on_token: OnToken | None,
) -> None:
    """Take one sampled token per unfinished row; decide which rows are finished."""
    params = rows.params
    for i in range(rows.n):
        if rows.finish[i] is not None:
            continue
        tok = int(host_tok[i])
        if params.stop_at_eos and tok == cfg.eos_token:
            rows.finish[i] = FINISH_EOS
            continue
        rows.out[i].append(tok)
        if on_token:
            on_token(i, tok)
        if _hit_stop(rows, i, decode_text):
            continue
        rows.finish[i] = _out_of_room(rows, i, len(rows.out[i]), lengths, cfg)


def _out_of_room(
    rows: _Rows, i: int, generated: int, lengths: np.ndarray, cfg: ModelConfig
) -> str | None:
    """The finish reason of row i after `generated` tokens when it has no room for another
    (max tokens, or its context full), else None."""
    if generated >= rows.params.max_tokens:
        return FINISH_LENGTH
    if lengths[i] + generated >= cfg.sequence_len:
        return FINISH_CONTEXT
    return None


def _hit_stop(rows: _Rows, i: int, decode_text: Decoder | None) -> bool:
    """Has row `i`'s text reached a stop string? Then it finishes with its text cut before it."""
    stops = rows.params.stop
    if not stops or decode_text is None:
        return False
    text = decode_text(rows.out[i])
    cut = _stop_cut(text, stops)
    if cut is None:
        return False
    rows.finish[i], rows.texts[i] = FINISH_STOP, text[:cut]
    return True
