"""Token sampling: temperature, top-k, nucleus (top-p); temperature 0 means argmax.

Shapes: B batch, V vocab. Per-row settings so one batch can mix greedy and sampled prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


def first_argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first maximum; a NaN counts as the maximum, as in
    jnp.argmax) as two plain reductions: XLA:CPU runs argmax's variadic (value, index) reduce
    unvectorised, ~4 ms over a 131,072-entry row on the development CPU (docs/PERFORMANCE.md)."""
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """One batch's per-row sampling settings as host arrays (the same on every process, so they
    enter a program replicated), and the vocabulary limit: the arguments of `sample` that do not
    change from step to step."""

    seeds: np.ndarray  # [B] int32, one per row (see `row_seed`)
    temperature: np.ndarray  # [B] f32, 0 = greedy
    top_p: np.ndarray  # [B] f32 in (0, 1]
    top_k: np.ndarray  # [B] int32, 0 = off
    vocab_limit: int

    @classmethod
    def of(
        cls,
        seeds: Sequence[int] | np.ndarray,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        *,
        vocab_limit: int,
    ) -> RowSampling:
        """Every row with the same settings, each with its own seed."""
        b = len(seeds)
        return cls(
            seeds=np.asarray(seeds, np.int32),
            temperature=np.full(b, temperature, np.float32),
            top_p=np.full(b, top_p, np.float32),
            top_k=np.full(b, top_k, np.int32),
            vocab_limit=int(vocab_limit),
        )


def sample(
    logits: jax.Array,  # [B, V] f32
    row_seeds: jax.Array,  # [B] int32: one seed per row (independent of batch composition)
    step: jax.Array,  # int32 scalar: decode step
    temperature: jax.Array,  # [B] f32, 0 = greedy
    top_p: jax.Array,  # [B] f32 in (0, 1]
    top_k: jax.Array,  # [B] int32, 0 = off
    vocab_limit: int,  # ids >= this are never produced (tokenizer smaller than the model)
    native_argmax: bool = False,  # greedy pick by the native CPU kernel (single-device CPU)
) -> jax.Array:  # [B] int32
    v = logits.shape[-1]
    if native_argmax:  # one pass in C++; XLA:CPU's masked max/min took ~1.3 ms per step
        from grokctl import kernels

        greedy = kernels.argmax(logits, vocab_limit)
    else:
        masked = jnp.where(jnp.arange(v) < vocab_limit, logits.astype(jnp.float32), NEG_INF)
        greedy = first_argmax(masked).astype(jnp.int32)

    def drawn() -> jax.Array:
        lg = jnp.where(jnp.arange(v) < vocab_limit, logits.astype(jnp.float32), NEG_INF)
        scaled = lg / jnp.maximum(temperature, 1e-6)[:, None]
        desc = -jnp.sort(-scaled, axis=-1)  # [B, V] descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B, 1]
        desc = jnp.where(desc < kth, NEG_INF, desc)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        keep = jnp.sum(before < top_p[:, None], axis=-1)  # >= 1: the best token is always kept
        threshold = jnp.take_along_axis(desc, (keep - 1)[:, None], axis=-1)
        threshold = jnp.maximum(threshold, kth)
        filtered = jnp.where(scaled < threshold, NEG_INF, scaled)
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(row_seeds)
        picked = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature <= 0, greedy, picked)

    # An all-greedy batch skips the sort of the whole vocabulary (~50 ms a step at V = 131,072
    # on the development CPU): the same tokens, as greedy rows ignore the drawn ones.
    return jax.lax.cond(jnp.all(temperature <= 0), lambda: greedy, drawn)


def row_seed(seed: int, prompt: list[int], occurrence: int = 0) -> int:
    """Seed of one prompt's row, from (seed, the prompt's tokens, how many identical prompts came
    before it): a prompt samples the same tokens alone or inside any batch."""
    digest = hashlib.blake2b(repr((seed, list(prompt), occurrence)).encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


def adjust_logits(
    logits: jax.Array,  # [B, V] f32
    recent: jax.Array,  # [B, W] int32: the last W tokens of each row (prompt and output), -1 = none
    repeat_penalty: jax.Array,  # [B] f32 > 0, 1 = off
    min_p: jax.Array,  # [B] f32 in [0, 1], 0 = off
) -> jax.Array:  # [B, V] f32
    """llama.cpp's repeat penalty, then min-p, as a transformation of the logits.

    Repeat penalty: the logit of every token seen in the last W tokens is divided by the penalty
    when positive and multiplied by it when negative (llama.cpp `--repeat-penalty`,
    `--repeat-last-n`). Min-p: tokens whose probability is below `min_p` times the most likely
    token's are removed (p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)); the most
    likely token always stays, so greedy decoding is unaffected by min-p.
    """
    b, v = logits.shape
    logits = logits.astype(jnp.float32)
    rows = jnp.arange(b)[:, None]
    seen = (
        jnp.zeros((b, v), jnp.bool_)
        .at[rows, jnp.where(recent >= 0, recent, v)]
        .set(True, mode="drop")
    )
    pen = repeat_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / pen, logits * pen), logits)
    top = jnp.max(logits, axis=-1, keepdims=True)
    floor = top + jnp.log(jnp.maximum(min_p, 1e-30))[:, None]
    return jnp.where((min_p[:, None] > 0) & (logits < floor), NEG_INF, logits)


def top_logprobs(
    logits: jax.Array,  # [B, V] f32: the model's logits (before any sampling adjustment)
    chosen: jax.Array,  # [B] int32: the sampled tokens
    n: int,  # how many alternatives per row
    vocab_limit: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log-probability of each chosen token [B], top-n ids [B, n], their log-probabilities)."""
    v = logits.shape[-1]
    masked = jnp.where(jnp.arange(v) < vocab_limit, logits.astype(jnp.float32), NEG_INF)
    lp = jax.nn.log_softmax(masked, axis=-1)
    chosen_lp = jnp.take_along_axis(lp, chosen[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, n)
    return chosen_lp, top_ids.astype(jnp.int32), top_lp
