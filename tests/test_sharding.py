"""Any DxM mesh over local devices: the same logits on 1x1, 1x2, 1x8, 2x4 (and the expert
layout), all within the golden fixture's tolerance; clear errors for meshes that cannot work."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import grokctl
from grokctl.cli.app import main
from grokctl.errors import UsageError
from grokctl.model import sharding as shd
from tests.golden import Pairs, assert_rule1, load_acceptance

CASES = ("plain", "leftpad", "rightpad", "midpad")  # right-padded to 64 and run as one batch
T = 64


def _batch(golden: np.lib.npyio.NpzFile) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(CASES), T), np.int32)
    valid = np.zeros((len(CASES), T), bool)
    for i, case in enumerate(CASES):
        n = len(golden[f"tokens_{case}"])
        tokens[i, :n], valid[i, :n] = golden[f"tokens_{case}"], golden[f"valid_{case}"]
    return tokens, valid


def _pairs(logits: np.ndarray, golden: np.lib.npyio.NpzFile) -> Pairs:
    """(ours, reference) logits at the valid positions of each case of the batch."""
    pairs = []
    for i, case in enumerate(CASES):
        valid = golden[f"valid_{case}"]
        pairs.append((logits[i, : len(valid)][valid], golden[f"logits_{case}"][valid]))
    return pairs


@pytest.fixture(scope="module")
def mesh_logits(grok_tiny: Path) -> dict[str, np.ndarray]:
    golden = np.load(grok_tiny / "golden.npz")
    tokens, _ = _batch(golden)
    out = {}
    devices = jax.devices()
    for text, layout in (
        ("1x1", "tensor"),
        ("1x2", "tensor"),
        ("1x8", "tensor"),
        ("2x4", "tensor"),
        ("1x8", "expert"),
    ):
        d, m = shd.parse_mesh_shape(text)
        model = grokctl.load_model(
            grok_tiny, mesh=shd.make_mesh(text, devices[: d * m]), layout=layout
        )
        assert dict(model.mesh.shape) == {"data": d, "model": m}
        out[f"{text}/{layout}"] = model.logits(tokens)
    return out


@pytest.mark.slow
def test_every_mesh_passes_the_golden_acceptance(
    grok_tiny: Path, mesh_logits: dict[str, np.ndarray]
) -> None:
    golden = np.load(grok_tiny / "golden.npz")
    acc = load_acceptance(grok_tiny)
    for name, logits in mesh_logits.items():
        assert_rule1(_pairs(logits, golden), acc, name)


@pytest.mark.slow
def test_meshes_agree_with_each_other(grok_tiny: Path, mesh_logits: dict[str, np.ndarray]) -> None:
    golden = np.load(grok_tiny / "golden.npz")
    _, valid = _batch(golden)
    base = mesh_logits["1x1/tensor"][valid]
    for name, logits in mesh_logits.items():
        d = np.abs(logits[valid] - base).max(-1)  # per position
        # Only reduction order differs (measured: median 0, max 0.07); allow a rare routing
        # flip on a near-tie, nothing more.
        assert np.median(d) <= 1 / 32 and np.mean(d <= 0.125) >= 0.98, (name, np.median(d))


def test_scale_blocks_follow_rows_on_model_axes_1_2_4_8() -> None:
    name = "transformer/decoder_layer_0/moe/linear_1/w"
    weight, scales = (8, 176, 128), (8, 8, 128)  # grok-tiny's [E, F, D] with 8 scale blocks
    for m in (1, 2, 4, 8):
        sizes = shd.mesh_sizes(1, m)
        assert shd.param_spec(name, weight, sizes) == shd.param_spec(
            name, scales, sizes, scales=True
        )
        assert shd.shard_shape(scales, shd.param_spec(name, scales, sizes, scales=True), sizes) == (
            8,
            8 // m,
            128,
        )
    # More row shards than scale blocks: the (tiny) scales are kept whole on every device.
    sizes = shd.mesh_sizes(1, 16)
    spec = shd.param_spec(name, (8, 32768, 6144), sizes)
    assert shd.spec_text(spec) == "-, model, -"
    assert shd.spec_text(shd.param_spec(name, (8, 8, 6144), sizes, scales=True)) == "replicated"


def test_expert_layout_shards_experts() -> None:
    sizes = shd.mesh_sizes(1, 8)
    for leaf in ("linear", "linear_v", "linear_1"):
        name = f"transformer/decoder_layer_3/moe/{leaf}/w"
        assert (
            shd.spec_text(shd.param_spec(name, (8, 64, 64), sizes, layout="expert"))
            == "model, -, -"
        )
    attn = "transformer/decoder_layer_3/multi_head_attention/query/w"
    assert shd.param_spec(attn, (64, 64), sizes, "expert") == shd.param_spec(attn, (64, 64), sizes)


def test_dimension_that_does_not_divide_names_the_tensor() -> None:
    with pytest.raises(UsageError, match=r"key/w: dimension 12 .* mesh axis 'model' of size 8"):
        shd.param_spec(
            "transformer/decoder_layer_0/multi_head_attention/key/w", (64, 12), shd.mesh_sizes(1, 8)
        )


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        ("1x3", "1x3 = 3 devices, but 8 are available"),
        ("4x4", "4x4 = 16 devices, but 8 are available"),
        ("eight", "expected DxM"),
        ("0x8", "must be >= 1"),
    ],
)
def test_generate_rejects_a_mesh_that_does_not_match(
    grok_tiny: Path, mesh: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["generate", "--checkpoint", str(grok_tiny), "--token-ids", "1,2,3", "--mesh", mesh]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_generate_on_a_2x4_mesh_from_the_environment(
    grok_tiny: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GROKCTL_MESH reaches generate; the batch pads to the data axis; greedy tokens equal 1x8's."""
    import json

    argv = [
        "generate",
        "--checkpoint",
        str(grok_tiny),
        "--token-ids",
        "5,6,7",
        "--max-tokens",
        "4",
        "--json",
    ]
    monkeypatch.setenv("GROKCTL_MESH", "2x4")
    assert main(argv) == 0
    on_2x4 = json.loads(capsys.readouterr().out)
    assert main([*argv, "--mesh", "1x8"]) == 0
    on_1x8 = json.loads(capsys.readouterr().out)
    assert on_2x4["token_ids"] == on_1x8["token_ids"] and len(on_2x4["token_ids"]) == 4
