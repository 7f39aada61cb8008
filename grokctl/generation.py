"""Batched generation: prefill once, decode step by step, stop per prompt.

Each prompt gets its own tokens, finish reason and counts; prompts run as one batch (right-
padded to a bucket), and a prompt's tokens do not depend on the batch it runs in.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from grokctl.config import SETTINGS, ModelConfig
from grokctl.engine import Engine, bucket
from grokctl.errors import UsageError
from grokctl.sampling import adjust_logits, row_seed, top_logprobs

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"  # --max-tokens reached
FINISH_CONTEXT = "context"  # the context window is full
FINISH_INTERRUPTED = "interrupted"  # Ctrl-C: the tokens so far


def _default(name: str) -> Any:
    return SETTINGS[name].default


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen; defaults and ranges are those of `grokctl.config.SETTINGS`."""

    max_tokens: int = _default("max_tokens")
    temperature: float = _default("temperature")
    top_p: float = _default("top_p")
    top_k: int = _default("top_k")
    seed: int = _default("seed")
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    min_p: float = _default("min_p")
    repeat_penalty: float = _default("repeat_penalty")
    repeat_last_n: int = _default("repeat_last_n")
    logprobs: int = _default("logprobs")

    def validate(self) -> SamplingParams:
        for name in (
            "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
            "repeat_last_n", "logprobs",
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
    cfg = engine.cfg
    if params.stop and decode_text is None:
        raise UsageError(
            "--stop needs a tokenizer to compare text (not available with --token-ids alone)"
        )
    check_prompts(cfg, prompts)
    ctx = cfg.sequence_len

    n = len(prompts)
    b = engine.padded_batch(n)
    rows = _Rows(prompts, params, b)
    lengths = np.array([len(p) for p in prompts] + [1] * (b - n), np.int32)
    t_bucket = bucket(int(lengths.max()), ctx)
    cache_len = bucket(int(lengths.max()) + params.max_tokens, ctx)
    tokens = np.zeros((b, t_bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    seen: Counter[tuple[int, ...]] = Counter()
    seeds = []
    for p in prompts:
        seeds.append(row_seed(params.seed, list(p), seen[tuple(p)]))
        seen[tuple(p)] += 1
    seeds += [0] * (b - n)
    temp = np.full(b, params.temperature, np.float32)
    top_p = np.full(b, params.top_p, np.float32)
    top_k = np.full(b, params.top_k, np.int32)
    penalty = np.full(b, params.repeat_penalty, np.float32)
    min_p = np.full(b, params.min_p, np.float32)
    limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)

    def choose(logits: jax.Array, step: int) -> tuple[jax.Array, np.ndarray]:
        adjusted = logits
        if params.adjusts_logits:  # through the engine: its compile time is counted apart
            adjusted = engine._run("adjust", _adjust, (logits, rows.recent(), penalty, min_p))
        tok = engine.sample(adjusted, np.array(seeds), step, temp, top_p, top_k, limit)
        host = np.asarray(jax.device_get(tok))
        if rows.logprobs is not None:
            lp = engine._run(
                "logprobs", _top_logprobs, (logits, tok), n=params.logprobs, vocab_limit=limit
            )
            chosen, ids, top = (engine.fetch(x) for x in lp)
            for i in range(n):
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
        return tok, host

    compile0 = engine.compile_seconds
    t0 = time.perf_counter()
    t_prefill = t_decode = 0.0
    compile1 = compile0
    step = 0
    try:
        cache = engine.new_cache(b, cache_len)
        logits, cache = engine.prefill(tokens, lengths, cache)
        next_tok, host_tok = choose(logits, 0)
        t_prefill = time.perf_counter() - t0 - (engine.compile_seconds - compile0)
        compile1 = engine.compile_seconds
        t1 = time.perf_counter()
        while True:
            _accept(rows, host_tok, lengths, cfg, decode_text, on_token)
            if rows.done:
                break
            if int(lengths.max()) + step + 1 >= cache_len:  # cache full for the longest row
                rows.finish = [f or FINISH_CONTEXT for f in rows.finish]
                break
            step += 1
            logits, cache = engine.decode(next_tok, cache)
            next_tok, host_tok = choose(logits, step)
        t_decode = time.perf_counter() - t1 - (engine.compile_seconds - compile1)
    except KeyboardInterrupt:
        rows.interrupt()
    compile_s = engine.compile_seconds - compile0

    results = []
    for i, p in enumerate(prompts):
        final: str | None = rows.texts[i]
        if final is None and decode_text is not None:
            final = decode_text(rows.out[i])
        results.append(
            Completion(
                prompt_token_ids=list(p),
                token_ids=rows.out[i],
                finish_reason=rows.finish[i] or FINISH_LENGTH,
                text=final,
                prefill_tokens_per_s=float(lengths[:n].sum()) / t_prefill if t_prefill > 0 else 0.0,
                decode_tokens_per_s=(step * n) / t_decode if t_decode > 0 and step else 0.0,
                compile_seconds=compile_s,
                logprobs=rows.logprobs[i][: len(rows.out[i])]
                if rows.logprobs is not None
                else None,
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
        if params.stop and decode_text is not None:
            text = decode_text(rows.out[i])
            cut = _stop_cut(text, params.stop)
            if cut is not None:
                rows.finish[i], rows.texts[i] = FINISH_STOP, text[:cut]
                continue
        if len(rows.out[i]) >= params.max_tokens:
            rows.finish[i] = FINISH_LENGTH
        elif lengths[i] + len(rows.out[i]) >= cfg.sequence_len:
            rows.finish[i] = FINISH_CONTEXT
