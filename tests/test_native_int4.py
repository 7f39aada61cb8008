"""int4 at run time (packed two per byte, dequantized inside jitted code) and inspect's plans
for a quantized Grok-1. No checkpoint is loaded here: tiny arrays and shapes only."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grokctl.checkpoint import native
from grokctl.cli.app import main
from grokctl.model.quant import QuantizedWeight, chunked_qmatmul, dequantize, qmatmul, take_expert

BF16 = ml_dtypes.bfloat16


def random_int4(rng: np.random.Generator, lead: tuple[int, ...], k: int, n: int, g: int):  # type: ignore[no-untyped-def]
    q = rng.integers(-8, 8, (*lead, k, n)).astype(np.int8)
    s = (rng.random((*lead, g, n)) * 0.1 + 1e-3).astype(BF16)
    return q, s


def numpy_dequantize(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The reference: int value x bf16 scale, rounded once to bf16."""
    *lead, k, n = q.shape
    g = s.shape[-2]
    v = q.reshape(*lead, g, k // g, n).astype(np.float32) * s.astype(np.float32)[..., :, None, :]
    return v.reshape(q.shape).astype(BF16)


def test_pack_unpack_round_trip_and_nibble_order() -> None:
    q = np.array([[1, -1], [-8, 7], [0, 3], [-2, -5]], np.int8)  # [K=4, N=2]
    p = native.pack_int4(q)
    assert p.dtype == np.uint8 and p.shape == (2, 2)
    assert p[0, 0] == (1 | (0x8 << 4)) and p[0, 1] == (0xF | (7 << 4))  # row 0 low, row 1 high
    assert np.array_equal(native.unpack_int4(p), q)
    from grokctl.model.quant import unpack_int4

    assert np.array_equal(np.asarray(unpack_int4(jnp.asarray(p))), q)


def test_int4_dequantize_in_jax_equals_numpy_exactly() -> None:
    rng = np.random.default_rng(0)
    q, s = random_int4(rng, (3,), 256, 48, 8)
    w = QuantizedWeight(jnp.asarray(native.pack_int4(q)), jnp.asarray(s), bits=4)
    assert w.shape == (3, 256, 48)
    got = np.asarray(jax.jit(lambda w: dequantize(w, BF16))(w))  # int4 values are bf16
    assert got.dtype == BF16
    assert np.array_equal(got.view(np.uint16), numpy_dequantize(q, s).view(np.uint16))
    # An expert's slice keeps the packing and `bits` (a static pytree field).
    one = jax.jit(take_expert)(w, jnp.int32(1))
    assert one.bits == 4 and one.weight.shape == (128, 48)
    assert np.array_equal(np.asarray(dequantize(one, BF16)), numpy_dequantize(q[1], s[1]))


@pytest.mark.parametrize("chunked", [False, True])
def test_int4_matmul_matches_the_dequantized_product(chunked: bool) -> None:
    rng = np.random.default_rng(1)
    q, s = random_int4(rng, (), 512, 96, 4)
    w = QuantizedWeight(jnp.asarray(native.pack_int4(q)), jnp.asarray(s), bits=4)
    x = rng.standard_normal((2, 512)).astype(BF16)
    with chunked_qmatmul(chunked):
        got = np.asarray(jax.jit(qmatmul)(jnp.asarray(x), w))
    exact = x.astype(np.float64) @ numpy_dequantize(q, s).astype(np.float64)
    # f32 accumulation of exact bf16 products: only the summation order differs. (The int8
    # matmul of the same integers differs: int8 values are exact, int4 ones bf16-rounded.)
    assert np.abs(got - exact).max() <= 1e-4 * np.abs(exact).max()


def test_group_rows() -> None:
    assert native.group_rows(6144, 128) == 128
    assert native.group_rows(96, 128) == 96
    assert native.group_rows(6 * 70, 128) == 84  # the largest divisor of 420 below 128
    assert native.group_rows(3 * 41, 64, bits=8) == 41
    assert native.group_rows(3 * 41, 128, bits=4) == 0  # odd: cannot pack two rows per byte
    assert native.group_rows(2 * 41, 128, bits=4) == 82


@pytest.mark.parametrize(("mesh", "memory"), [("1x4", "80"), ("1x2", "141")])
def test_inspect_grok1_int4_fits(
    mesh: str, memory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["inspect", "--preset", "grok-1", "--bits", "4", "--mesh", mesh]
    assert main([*argv, "--device-memory", memory, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plan, totals = report["plan"], report["totals"]
    assert plan["fits"] is True and totals["int4_tensors"] == 448
    # 4 bits per value of the 448 quantized tensors + bf16 scales per 128 rows + f32 rest.
    quantized = sum(t["params"] for t in report["tensors"] if t["quantized"])
    plain = totals["parameters"] - quantized
    assert totals["data_bytes"] == quantized // 2 + 2 * quantized // 128 + 4 * plain
    m = int(mesh.split("x")[1])
    # Every quantized tensor shards over the model axis; norms and router are replicated.
    replicated = sum(4 * t["params"] for t in report["tensors"] if t["spec"] == "replicated")
    assert plan["weights"] == (totals["data_bytes"] - replicated) // m + replicated
    assert main([*argv, "--device-memory", memory]) == 0
    text = capsys.readouterr().out
    assert "tensors (int4)" in text and "fits:" in text


def test_inspect_bits_refused_with_a_checkpoint_and_bad_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["inspect", "--preset", "grok-1", "--bits", "3", "--mesh", "1x8"]) == 2
    assert "--bits 3" in capsys.readouterr().err
    assert main(["inspect", "--preset", "grok-1", "--group-size", "1", "--mesh", "1x8"]) == 2
    assert "--group-size 1" in capsys.readouterr().err


def test_int4_xla_matmul_matches_the_dequantized_product() -> None:
    """The XLA path (prefill; no kernel) multiplies even and odd rows by the low and high
    nibbles separately: the same bf16-rounded weights, only the f32 summation order differs."""
    from grokctl.checkpoint.native.format import pack_int4

    rng = np.random.default_rng(11)
    q = rng.integers(-8, 8, (96, 40)).astype(np.int8)
    w = QuantizedWeight(
        jnp.asarray(pack_int4(q)), jnp.asarray(rng.uniform(0.01, 0.1, (3, 40)), jnp.bfloat16), 4
    )
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jnp.asarray(rng.standard_normal((20, 96)), dtype)
        with chunked_qmatmul(False):
            program = jax.jit(lambda a, b: qmatmul(a, b)).lower(x, w).as_text()
            got = np.asarray(jax.jit(lambda a, b: qmatmul(a, b))(x, w), np.float64)
        xf = np.asarray(x.astype(jnp.float32), np.float64)
        wf = np.asarray(dequantize(w).astype(jnp.float32), np.float64)
        bound = 96 * 2.0**-24 * (np.abs(xf) @ np.abs(wf)) + 1e-30
        assert np.all(np.abs(got - xf @ wf) <= bound)
        assert "stablehlo.concatenate" not in program  # no interleaved [K, N] weight
