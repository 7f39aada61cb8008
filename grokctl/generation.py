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

from grokctl.config import ModelConfig
from grokctl.engine import Engine, bucket
from grokctl.errors import UsageError
from grokctl.sampling import row_seed

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"  # --max-tokens reached
FINISH_CONTEXT = "context"  # the context window is full


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def validate(self) -> SamplingParams:
        if self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {self.top_k}")
        return self


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

    def to_json(self) -> dict[str, Any]:
        return {
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


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    decode_text: Decoder | None = None,
    vocab_limit: int | None = None,
    on_token: OnToken | None = None,
) -> list[Completion]:
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
    limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)

    compile0 = engine.compile_seconds
    t0 = time.perf_counter()
    cache = engine.new_cache(b, cache_len)
    logits, cache = engine.prefill(tokens, lengths, cache)
    next_tok = engine.sample(logits, np.array(seeds), 0, temp, top_p, top_k, limit)
    host_tok = np.asarray(jax.device_get(next_tok))
    t_prefill = time.perf_counter() - t0 - (engine.compile_seconds - compile0)
    compile1 = engine.compile_seconds

    out: list[list[int]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    texts: list[str | None] = [None] * n
    step = 0
    t1 = time.perf_counter()
    while True:
        for i in range(n):
            if finish[i] is not None:
                continue
            tok = int(host_tok[i])
            if params.stop_at_eos and tok == cfg.eos_token:
                finish[i] = FINISH_EOS
                continue
            out[i].append(tok)
            if on_token:
                on_token(i, tok)
            if params.stop and decode_text is not None:
                text = decode_text(out[i])
                cut = _stop_cut(text, params.stop)
                if cut is not None:
                    finish[i], texts[i] = FINISH_STOP, text[:cut]
                    continue
            if len(out[i]) >= params.max_tokens:
                finish[i] = FINISH_LENGTH
            elif lengths[i] + len(out[i]) >= ctx:
                finish[i] = FINISH_CONTEXT
        if all(f is not None for f in finish):
            break
        if int(lengths.max()) + step + 1 >= cache_len:  # cache full for the longest row
            for i in range(n):
                finish[i] = finish[i] or FINISH_CONTEXT
            break
        step += 1
        logits, cache = engine.decode(next_tok, cache)
        next_tok = engine.sample(logits, np.array(seeds), step, temp, top_p, top_k, limit)
        host_tok = np.asarray(jax.device_get(next_tok))
    t_decode = time.perf_counter() - t1 - (engine.compile_seconds - compile1)
    compile_s = engine.compile_seconds - compile0

    results = []
    for i, p in enumerate(prompts):
        final: str | None = texts[i]
        if final is None and decode_text is not None:
            final = decode_text(out[i])
        results.append(
            Completion(
                prompt_token_ids=list(p),
                token_ids=out[i],
                finish_reason=finish[i] or FINISH_LENGTH,
                text=final,
                prefill_tokens_per_s=float(lengths[:n].sum()) / t_prefill if t_prefill > 0 else 0.0,
                decode_tokens_per_s=(step * n) / t_decode if t_decode > 0 and step else 0.0,
                compile_seconds=compile_s,
            )
        )
    return results
