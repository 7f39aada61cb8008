"""Sparse expert dispatch: same result as the all-experts baseline, reading only chosen experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokctl.model.moe import block_size, moe_dense, moe_sparse, route
from grokctl.model.quant import QuantizedWeight8bit
from grokctl.quantizers.int8 import quantize_int8

E, D, F, K = 8, 64, 96, 2


@pytest.fixture(scope="module")
def weights() -> tuple[QuantizedWeight8bit, QuantizedWeight8bit, QuantizedWeight8bit, jax.Array]:
    rng = np.random.default_rng(0)

    def q(shape: tuple[int, ...], blocks: int) -> QuantizedWeight8bit:
        qw = quantize_int8(
            rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2]), blocks
        )
        return QuantizedWeight8bit(jnp.asarray(qw.weight), jnp.asarray(qw.scales))

    router = jnp.asarray(rng.standard_normal((D, E)).astype(np.float32))
    return q((E, D, F), 1), q((E, D, F), 1), q((E, F, D), 8), router


@pytest.mark.parametrize("n", [1, 3, 16, 40, 300])
def test_sparse_equals_dense(weights, n: int) -> None:  # type: ignore[no-untyped-def]
    w, v, w1, router = weights
    x = jnp.asarray(np.random.default_rng(n).standard_normal((n, D)), jnp.bfloat16)
    _, gates, experts = route(x, router, K)
    sparse = jax.jit(moe_sparse)(x, gates, experts, w, v, w1)
    dense = jax.jit(moe_dense)(x, gates, experts, w, v, w1)
    np.testing.assert_allclose(
        np.asarray(sparse, np.float32), np.asarray(dense, np.float32), rtol=0.02, atol=0.02
    )
    assert np.abs(np.asarray(dense, np.float32)).mean() > 0.05  # not trivially zero


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("n, block", [(16, None), (300, None), (300, 32)])
def test_padding_runs_no_expert(weights, n: int, block: int | None, kernels: bool) -> None:  # type: ignore[no-untyped-def]
    """Tokens marked not live (a prompt's padding) get zeros from both dispatch forms (the
    native rows kernel, sorted blocks) — no expert ran for them — and the live tokens what
    they get with every token live."""
    from grokctl.model.quant import chunked_qmatmul

    w, v, w1, router = weights
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.bfloat16)
    _, gates, experts = route(x, router, K)
    live = rng.random(n) < 0.6
    run = jax.jit(lambda live: moe_sparse(x, gates, experts, w, v, w1, block, live))
    with chunked_qmatmul(kernels):
        got = np.asarray(run(jnp.asarray(live)), np.float32)
        full = np.asarray(run(jnp.ones(n, bool)), np.float32)
    assert (got[~live] == 0).all()
    np.testing.assert_allclose(got[live], full[live], rtol=1e-2, atol=1e-2)  # bf16 outputs
    assert np.mean(got[live] == full[live]) > 0.95
    assert np.abs(full).mean() > 0.05


def test_block_sizes() -> None:
    assert block_size(1, 2, 8) == 1  # decode, batch 1: one block per chosen expert
    assert block_size(8, 2, 8) == 8
    assert block_size(512, 2, 8) == 128
    assert block_size(100_000, 2, 8) == 512


def _hlo(fn, *args) -> str:  # type: ignore[no-untyped-def]
    return jax.jit(fn).lower(*args).compile().as_text()


def test_decode_step_never_dequantizes_all_experts(weights) -> None:  # type: ignore[no-untyped-def]
    """One token: the sparse program holds no [E, D, F] full-precision tensor; the dense one does."""
    w, v, w1, router = weights
    x = jnp.ones((1, D), jnp.bfloat16)
    _, gates, experts = route(x, router, K)
    all_experts = f"bf16[{E},{D},{F}]"
    assert all_experts in _hlo(moe_dense, x, gates, experts, w, v, w1)
    sparse_hlo = _hlo(moe_sparse, x, gates, experts, w, v, w1)
    assert all_experts not in sparse_hlo and f"f32[{E},{F},{D}]" not in sparse_hlo
    assert "dynamic-slice" in sparse_hlo and "while" in sparse_hlo  # one expert per loop step


@pytest.mark.parametrize("m", [1, 5])
def test_chunked_int8_matmul_equals_dequantize_then_dot(weights, m: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from grokctl.model.quant import chunked_qmatmul, qmatmul, take_expert

    # the chunked scan is the fallback where the native kernels are off (tests/test_kernels.py)
    monkeypatch.setenv("GROKCTL_CPU_KERNELS", "0")

    w, _, w1, _ = weights
    rng = np.random.default_rng(m)
    for weight in (take_expert(w, jnp.int32(3)), take_expert(w1, jnp.int32(5))):  # G = 1 and G = 8
        x = jnp.asarray(rng.standard_normal((m, weight.shape[0])), jnp.bfloat16)
        # Fresh functions: the flag is read at trace time, and jit caches traces per function.
        with chunked_qmatmul(False):
            plain = jax.jit(lambda a, b: qmatmul(a, b))(x, weight)
        with chunked_qmatmul(True):
            fn = jax.jit(lambda a, b: qmatmul(a, b))
            lowered = fn.lower(x, weight).as_text()
            chunked = fn(x, weight)
        assert "while" in lowered  # the chunked path really ran
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), rtol=1e-4, atol=1e-4)
        # both are x . (int8 x scale) with exact weight values (not rounded to bf16), f32 sums
        sl = weight  # kernels off: take_expert sliced it already
        q, s = (
            np.asarray(sl.weight, np.float64),
            np.asarray(sl.scales.astype(jnp.float32), np.float64),
        )
        k, n = q.shape
        wv = (q.reshape(s.shape[0], -1, n) * s[:, None, :]).reshape(k, n)
        xf = np.asarray(x.astype(jnp.float32), np.float64)
        bound = k * 2.0**-24 * (np.abs(xf) @ np.abs(wv)) + 1e-30
        for got in (plain, chunked):
            assert np.all(np.abs(np.asarray(got, np.float64) - xf @ wv) <= bound)
