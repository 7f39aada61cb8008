"""The int4 quantizer (quantizers/int4.py): packing layout, exact dequantization, clipping search,
group-size fallback; and `quantize --dry-run` on a Grok-1-shaped sparse stand-in of the release."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from grokctl.cli.app import main
from grokctl.errors import UsageError
from grokctl.quantizers.int4 import (
    dequantize_blocks,
    dequantize_int4,
    group_size_for,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from grokctl.quantizers.int8 import dequantize_int8

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_packing_layout_low_nibble_is_the_even_row() -> None:
    q = np.array([[1, -1], [-1, 7], [-8, 0], [3, -7]], np.int8)  # [K=4, N=2]
    p = pack_int4(q)
    assert p.dtype == np.uint8 and p.shape == (2, 2)
    # row 0 = (row 0 low, row 1 high): 1 | 0xF << 4 = 0xF1; -1 | 7 << 4 = 0x7F
    assert p[0].tolist() == [0xF1, 0x7F]
    assert p[1].tolist() == [0x38, 0x90]  # -8 = 0x8 low, 3 high; 0 low, -7 = 0x9 high
    assert np.array_equal(unpack_int4(p), q)
    rng = np.random.default_rng(0)
    many = rng.integers(-8, 8, (3, 64, 5)).astype(np.int8)
    assert np.array_equal(unpack_int4(pack_int4(many)), many)


def test_dequantize_is_the_models_value_exactly(grok_tiny: Path) -> None:
    """int8 x bf16 scale (exact), bit for bit what model.quant.dequantize computes in JAX."""
    import jax.numpy as jnp

    from grokctl.checkpoint.index import CheckpointIndex
    from grokctl.model.quant import QuantizedWeight8bit, dequantize

    e = CheckpointIndex.open(grok_tiny).by_name()["transformer/decoder_layer_0/moe/linear_1/w"]
    w, s = (np.asarray(a) for a in e.load())  # type: ignore[misc]
    ours = dequantize_int8(w, s)
    theirs = np.asarray(dequantize(QuantizedWeight8bit(jnp.asarray(w), jnp.asarray(s))))
    assert theirs.dtype == np.float32
    assert np.array_equal(ours, theirs)
    # and not the bf16-rounded value the reference computes (that is what changes here)
    assert not np.array_equal(ours, dequantize_blocks(w, s))


def test_int4_round_trip_and_clip_search_never_worse() -> None:
    rng = np.random.default_rng(1)
    # Heavy-tailed weights: a few outliers per group make clipping pay off.
    w = rng.standard_t(4, (4, 256, 96)).astype(np.float32)
    rtn = quantize_int4(w, 64, clip_search=False)
    best = quantize_int4(w, 64, clip_search=True)
    assert rtn.method == "rtn" and best.method == "clip-search"
    assert best.sq_error < rtn.sq_error
    for r in (rtn, best):
        assert r.packed.shape == (4, 128, 96) and r.packed.dtype == np.uint8
        assert r.scales.shape == (4, 4, 96) and r.scales.dtype == BF16
        q = unpack_int4(r.packed)
        assert q.min() >= -7 and q.max() <= 7
        rec = dequantize_int4(r.packed, r.scales)
        diff = rec - w
        assert np.isclose(float(np.square(diff, dtype=np.float64).sum()), r.sq_error, rtol=1e-5)
        assert float(np.abs(diff).max()) == pytest.approx(r.max_abs_error)
    # Round to nearest: every value within half a step (plus bf16 rounding of the product).
    step = rtn.scales.astype(np.float32).repeat(64, axis=-2)
    rec = dequantize_int4(rtn.packed, rtn.scales)
    assert np.all(np.abs(rec - w) <= step / 2 + np.abs(rec) * 2**-8 + 1e-6)
    rel = np.sqrt(best.sq_error / np.square(w, dtype=np.float64).sum())
    assert rel < 0.16  # measured 0.1513 (round to nearest alone: more)


@pytest.mark.filterwarnings("error")  # a zero group never walks the grid down to a zero scale
def test_int4_scales_have_5_significant_bits_so_every_value_is_exact() -> None:
    """Scales of INT4_SCALE_BITS significant bits: q x scale is a bf16 value for every q, so the
    model's value (rounded to bf16) is the exact product, the form the CPU kernels sum unscaled."""
    from grokctl.checkpoint.native.format import INT4_SCALE_BITS

    assert INT4_SCALE_BITS == 5
    rng = np.random.default_rng(3)
    w = (rng.standard_t(3, (2, 128, 40)) * np.logspace(-15, 15, 40)).astype(np.float32)
    w[0, :64, 0] = 0.0  # an all-zero group
    for clip in (False, True):
        r = quantize_int4(w, 64, clip_search=clip)
        assert np.all(r.scales.view(np.uint16) & 7 == 0)
        q = unpack_int4(r.packed).astype(np.float32)
        exact = q * r.scales.astype(np.float32).repeat(64, axis=-2)
        assert np.array_equal(dequantize_int4(r.packed, r.scales), exact)


def test_clip_search_finds_the_best_5_bit_scale_of_each_group() -> None:
    """Brute force over every 5-bit value in [0.75, 1] x max|w| / 7 (and the smallest one above):
    per group, no scale on the grid reconstructs the group with a smaller squared error."""
    rng = np.random.default_rng(4)
    w = rng.standard_t(4, (64, 12)).astype(np.float32)
    r = quantize_int4(w, 16)
    got = r.scales.astype(np.float32)
    grid = np.array(
        [m * 2.0**e for e in range(-12, 4) for m in range(16, 32)], np.float32
    )  # 1.xxxx x 2^e
    for g in range(4):
        wg = w[16 * g : 16 * (g + 1)]
        for n in range(12):
            col = wg[:, n]
            amax = np.abs(col).max()
            top = grid[grid >= amax / 7].min()
            cands = grid[(grid >= np.float32(amax * 0.75 / 7)) & (grid <= top)]
            errs = [np.square(np.clip(np.rint(col / s), -7, 7) * s - col).sum() for s in cands]
            best = np.square(np.clip(np.rint(col / got[g, n]), -7, 7) * got[g, n] - col).sum()
            assert got[g, n] in cands and best <= min(errs) * (1 + 1e-6), (g, n)


def test_group_size_falls_back_to_a_divisor_of_k() -> None:
    assert group_size_for(6144, 128) == 128
    assert group_size_for(32768, 128) == 128
    assert group_size_for(176, 128) == 88  # the fixture's ffn size
    assert group_size_for(96, 128) == 96
    assert group_size_for(200, 64) == 50
    with pytest.raises(UsageError):
        group_size_for(128, 1)


# --- dry run on the full Grok-1 layout ---------------------------------------------------------


def _grok1_int4_bytes(group: int = 128) -> int:
    """Grok-1 int4 tensor data from its published shapes (V, D, F, E, L, heads)."""
    v, d, f, e, layers, hq, hkv, k = 131072, 6144, 32768, 8, 64, 48, 8, 128

    def q4(lead: int, kk: int, n: int) -> int:
        return lead * (kk // 2 * n + 2 * (kk // group) * n)

    layer = (
        2 * q4(e, d, f)  # moe linear, linear_v
        + q4(e, f, d)  # moe linear_1
        + 2 * q4(1, d, hq * k)  # query, linear (hk = d)
        + 2 * q4(1, d, hkv * k)  # key, value
        + 4 * d * 4  # four rms norms, f32
        + d * e * 4  # router, f32
    )
    return layers * layer + v * d * 4 + d * 4  # + embeddings f32 + final norm


@pytest.fixture(scope="module")
def grok1_sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grokctl.checkpoint.xai.sizes import write_sparse_checkpoint
    from grokctl.config import preset

    return write_sparse_checkpoint(tmp_path_factory.mktemp("g1") / "grok-1", preset("grok-1"))


def test_dry_run_on_the_full_grok1_layout(
    grok1_sparse: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "grok-1-int4"
    code = main(["quantize", str(grok1_sparse), str(dst), "--dry-run", "--json", "--mesh", "1x4"])
    assert code == 0, capsys.readouterr().err
    plan = json.loads(capsys.readouterr().out)
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    assert plan["tensors"] == 770 and plan["quantized_tensors"] == 64 * 7
    # The release's array data: its 318,239,886,140 file bytes less 770 pickle headers.
    assert plan["source_format"] == "xai" and plan["source_bytes"] == 318_239_694_848
    assert plan["output_bytes"] == _grok1_int4_bytes() == 165_597_437_952  # 52% of the source
    shards = plan["shards"]
    assert sum(s["bytes"] for s in shards) == plan["output_bytes"]
    assert sum(s["tensors"] for s in shards) == 770
    assert all(s["bytes"] <= 5 * 10**9 for s in shards)
    assert shards[0]["file"] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert plan["group_size_fallbacks"] == []
    # 1x4: each device holds a quarter of every sharded weight (+ replicated small tensors).
    dev = plan["per_device"]
    assert plan["mesh"] == {"data": 1, "model": 4}
    assert 0.25 * plan["output_bytes"] < dev["weights"] < 0.27 * plan["output_bytes"]
    assert dev["total"] < 80 * 2**30  # fits 4 x 80 GB
    # The same numbers `inspect --preset grok-1 --bits 4 --mesh 1x4` plans from shapes alone.
    from grokctl.inspect import inspect as inspect_plan

    ref = inspect_plan(preset="grok-1", mesh=(1, 4), bits=4, group_size=128).plan
    assert (dev["weights"], dev["kv_cache"], dev["working"], dev["total"]) == (
        ref.weights,
        ref.kv_cache,
        ref.working_total,
        ref.total,
    )

    code = main(["quantize", str(grok1_sparse), str(dst), "--dry-run", "--bits", "8"])
    assert code == 0
    text = capsys.readouterr().out
    assert "8-bit" in text and "per device on a 1x1 mesh" in text
