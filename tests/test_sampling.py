"""Sampling: greedy, temperature, top-k, top-p, vocabulary limit, batch-independent seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grokctl.sampling import row_seed, sample

sample_jit = jax.jit(sample, static_argnames=("vocab_limit",))


def _draw(
    logits: np.ndarray,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    limit: int | None = None,
) -> np.ndarray:
    b = n
    lg = jnp.asarray(np.tile(logits, (b, 1)), jnp.float32)
    return np.asarray(
        sample_jit(
            lg,
            jnp.arange(b, dtype=jnp.int32),
            jnp.int32(3),
            jnp.full(b, temperature, jnp.float32),
            jnp.full(b, top_p, jnp.float32),
            jnp.full(b, top_k, jnp.int32),
            vocab_limit=limit or logits.shape[-1],
        )
    )


LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float32))


def test_temperature_zero_is_argmax() -> None:
    assert set(_draw(LOGITS, 64, 0.0)) == {0}


def test_temperature_one_follows_the_distribution() -> None:
    draws = _draw(LOGITS, 4000, 1.0)
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.03)


def test_top_k_keeps_only_k_tokens() -> None:
    draws = _draw(LOGITS, 2000, 1.0, top_k=2)
    assert set(draws) == {0, 1}
    freq = np.bincount(draws, minlength=4)[:2] / len(draws)
    np.testing.assert_allclose(freq, [2 / 3, 1 / 3], atol=0.04)


def test_top_p_is_the_nucleus() -> None:
    assert set(_draw(LOGITS, 500, 1.0, top_p=0.5)) == {0}  # 0.5 alone reaches p
    assert set(_draw(LOGITS, 2000, 1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.75
    assert set(_draw(LOGITS, 4000, 1.0, top_p=0.8)) == {0, 1, 2}


def test_vocab_limit_is_never_exceeded() -> None:
    logits = np.array([0.0, 0.0, 5.0, 9.0], np.float32)
    assert set(_draw(logits, 200, 1.0, limit=2)) <= {0, 1}
    assert set(_draw(logits, 10, 0.0, limit=3)) == {2}


def test_row_seed_depends_on_prompt_not_batch_position() -> None:
    assert row_seed(1, [5, 6]) == row_seed(1, [5, 6])
    assert row_seed(1, [5, 6]) != row_seed(2, [5, 6])
    assert row_seed(1, [5, 6], 0) != row_seed(1, [5, 6], 1)  # repeated prompts differ
    assert 0 <= row_seed(123, list(range(100))) < 2**31
