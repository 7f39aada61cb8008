"""Sampling: greedy, temperature, top-k, top-p, vocabulary limit, batch-independent seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grokctl.sampling import adjust_logits, row_seed, sample, top_logprobs

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


adjust_jit = jax.jit(adjust_logits)


def test_repeat_penalty_has_llama_cpp_semantics() -> None:
    """Logits of tokens in the window: positive divided by the penalty, negative multiplied."""
    logits = jnp.asarray([[2.0, -1.0, 3.0, -2.0, 0.5]], jnp.float32)
    recent = jnp.asarray([[0, 1, 1, -1]], jnp.int32)  # tokens 0 and 1 seen (1 twice), -1 = none
    out = np.asarray(adjust_jit(logits, recent, jnp.asarray([2.0]), jnp.asarray([0.0])))
    np.testing.assert_allclose(out, [[1.0, -2.0, 3.0, -2.0, 0.5]])  # each token once, not twice
    same = adjust_jit(logits, recent, jnp.asarray([1.0]), jnp.asarray([0.0]))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(logits))


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    logits = jnp.asarray(np.log(np.array([[0.5, 0.25, 0.15, 0.1]], np.float32)))
    none = jnp.full((1, 1), -1, jnp.int32)
    kept = np.isfinite(np.asarray(adjust_jit(logits, none, jnp.asarray([1.0]), jnp.asarray([0.3]))))
    assert kept.tolist() == [[True, True, True, False]]  # 0.15 >= 0.3*0.5 > 0.1
    draws = _draw(
        np.asarray(adjust_jit(logits, none, jnp.ones(1), jnp.asarray([0.45])))[0], 2000, 1.0
    )
    assert set(draws) == {0, 1}
    freq = np.bincount(draws, minlength=4)[:2] / len(draws)
    np.testing.assert_allclose(freq, [2 / 3, 1 / 3], atol=0.04)  # renormalised over the kept


def test_top_logprobs_are_the_log_softmax() -> None:
    logits = jnp.asarray([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 9.0]], jnp.float32)
    chosen, ids, top = jax.jit(top_logprobs, static_argnames=("n", "vocab_limit"))(
        logits, jnp.asarray([2, 0], jnp.int32), n=2, vocab_limit=3
    )
    lp0 = np.log(
        np.exp([1.0, 3.0, 2.0]) / np.exp([1.0, 3.0, 2.0]).sum()
    )  # id 3 is beyond the limit
    np.testing.assert_array_equal(np.asarray(ids), [[1, 2], [0, 1]])
    np.testing.assert_allclose(np.asarray(top)[0], [lp0[1], lp0[2]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(chosen), [lp0[2], np.log(1 / 3)], rtol=1e-5)


def test_first_argmax_matches_argmax_with_ties_and_nan() -> None:
    from grokctl.sampling import first_argmax

    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, (6, 257)).astype(np.float32)  # many ties
    x[2, 100] = np.nan
    x[2, 7] = np.nan  # first NaN wins, as in jnp.argmax
    x[4] = -np.inf
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert got[2] == 7 and got[4] == 0
