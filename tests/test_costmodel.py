"""The cost model against direct counts: the checkpoint index, the config's parameter count, and
the issue's bench-l2 figure (≈ 421 MB read per 8-bit decode token)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from grokctl import costmodel
from grokctl.checkpoint.index import CheckpointIndex
from grokctl.config import model_config_from_dict, preset
from grokctl.inspect import inspect
from tests.conftest import SHARED


def direct_decode_bytes(index: CheckpointIndex, batch: int, dense: bool = False) -> int:
    """Bytes a decode step reads, counted entry by entry over the index, independently."""
    cfg = index.config
    used = cfg.num_experts if dense else min(cfg.num_experts, cfg.num_selected_experts * batch)
    total = 0
    for e in index:
        w = e.ref.weight if e.quantized else e.ref  # type: ignore[union-attr]
        n = w.nbytes + (e.ref.scales.nbytes if e.quantized else 0)  # type: ignore[union-attr]
        if "/moe/" in e.name:
            n = n // cfg.num_experts * used  # [E, ...] tensors: `used` experts' slices
        if e.name == "language_model/in_out_embed/embeddings":
            n += batch * cfg.emb_size * w.dtype.itemsize  # the lookup's rows
        total += n
    return total


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("moe", ["sparse", "dense"])
def test_decode_bytes_match_a_direct_count_over_the_index(
    grok_tiny: Path, batch: int, moe: str
) -> None:
    index = CheckpointIndex.open(grok_tiny)
    got = costmodel.decode_weight_bytes(
        index.config, batch, moe, tensors=costmodel.index_tensor_bytes(index)
    )
    assert got.per_step == direct_decode_bytes(index, batch, dense=moe == "dense")
    assert got.per_token == got.per_step / batch
    # The released format counted from the config alone gives the same bytes.
    assert costmodel.index_precision(index) == costmodel.Precision("int8", embeddings="f32")
    assert costmodel.decode_weight_bytes(index.config, batch, moe).parts == got.parts


def test_demo_checkpoint_counts_match_too(demo_ckpt: Path) -> None:
    index = CheckpointIndex.open(demo_ckpt)
    got = costmodel.decode_weight_bytes(
        index.config, 1, tensors=costmodel.index_tensor_bytes(index)
    )
    assert got.per_step == direct_decode_bytes(index, 1)


def test_bench_l2_reads_about_421_mb_per_8bit_token() -> None:
    data = json.loads((SHARED / "benchmarks" / "bench-l2.json").read_text())
    cfg = model_config_from_dict(data, preset("grok-1"))
    eight_bit = costmodel.decode_weight_bytes(
        cfg, 1, precision=costmodel.Precision("int8", embeddings="int8")
    )
    assert eight_bit.parts["unembed"] == cfg.vocab_size * cfg.emb_size + 2 * cfg.vocab_size
    layers = eight_bit.per_step - eight_bit.parts["unembed"]
    assert 280e6 < layers < 290e6  # "286 MB of layers"
    assert 415e6 < eight_bit.per_token < 425e6  # "≈ 421 MB at 8 bits"
    released = costmodel.decode_weight_bytes(cfg, 1)  # f32 table: 537 MB of it
    assert released.parts["unembed"] == 4 * cfg.vocab_size * cfg.emb_size


def test_precisions_size_a_weight_as_documented() -> None:
    cfg = preset("grok-tiny")
    d, f, e = cfg.emb_size, cfg.ffn_size, cfg.num_experts
    name = "transformer/decoder_layer_0/moe/linear/w"  # [E, D, F], one scale block
    sizes = {
        w: dict(costmodel.tensor_bytes(cfg, costmodel.Precision(w, group_size=32)))[name]
        for w in ("int8", "int4", "bf16", "f32")
    }
    assert sizes["int8"] == e * d * f + 2 * e * 1 * f
    assert sizes["int4"] == e * d * f // 2 + 2 * e * (d // 32) * f
    assert sizes["bf16"] == 2 * e * d * f and sizes["f32"] == 4 * e * d * f
    emb = "language_model/in_out_embed/embeddings"
    v = cfg.vocab_size
    for fmt, want in (("f32", 4 * v * d), ("bf16", 2 * v * d), ("int8", v * d + 2 * v)):
        got = dict(costmodel.tensor_bytes(cfg, costmodel.Precision(embeddings=fmt)))[emb]
        assert got == want


def test_flops_are_twice_the_active_matmul_parameters_plus_attention() -> None:
    cfg = preset("grok-demo")
    d, h, k, layers = cfg.emb_size, cfg.num_q_heads, cfg.key_size, cfg.num_layers
    norms = d + 4 * d * layers  # not matmul weights
    for c in (1, 7, 100):
        want = 2 * (cfg.active_param_count() - norms) + 4 * h * k * c * layers
        assert costmodel.token_flops(cfg, c) == want
    # Dense computes every expert.
    idle = (cfg.num_experts - cfg.num_selected_experts) * 3 * d * cfg.ffn_size * layers
    assert costmodel.token_flops(cfg, 1, "dense") - costmodel.token_flops(cfg, 1) == 2 * idle
    # A prefill sums its tokens' FLOPs (positions depth+1 .. depth+T) and one row of logits.
    t, depth = 9, 5
    body = sum(costmodel.token_flops(cfg, depth + i, logits=False) for i in range(1, t + 1))
    assert costmodel.prefill_flops(cfg, t, depth) == pytest.approx(
        body + 2 * cfg.vocab_size * d, rel=1e-12
    )


def test_kv_bytes_are_the_inspect_plans() -> None:
    cfg = dataclasses.replace(preset("grok-demo"), num_layers=2)
    plan = inspect(preset="grok-demo", mesh=(1, 1), batch=3, seq_len=100).plan
    full = preset("grok-demo")
    assert plan.kv_cache == costmodel.kv_cache_bytes(full, 3, 100)
    per_pos = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.key_size * 2 + 1
    assert costmodel.kv_read_bytes(cfg, 2, 10) == 2 * 10 * per_pos
