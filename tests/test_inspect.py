"""`grokctl inspect`: the released numbers from shapes alone, the index of a real checkpoint,
shards that match what the loader places, and a memory plan checked against XLA."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import pytest

import grokctl
from grokctl import inspect as lib
from grokctl.cli.app import main
from grokctl.config import preset
from grokctl.model import sharding as shd
from tests.helpers import HEADERS_READ_LIMIT, bytes_read

GIB = 1 << 30


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["inspect", *argv, "--json"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, "stdout must hold only the JSON result"
    return json.loads(lines[0])


# --- the release, from shapes alone ------------------------------------------------------------

RELEASE_FILE_BYTES = {
    "language_model/in_out_embed/embeddings": 3_221_225_637,
    "language_model/rms_norm/scale": 24_727,
    "moe/linear/w": 1_611_137_347,
    "moe/linear_v/w": 1_611_137_347,
    "moe/linear_1/w": 1_611_399_491,
    "multi_head_attention/key/w": 6_293_814,
    "multi_head_attention/value/w": 6_293_814,
    "multi_head_attention/linear/w": 37_847_359,
    "multi_head_attention/query/w": 37_761_334,
    "rms_norm/scale": 24_727,
    "rms_norm_1/scale": 24_727,
    "rms_norm_2/scale": 24_727,
    "rms_norm_3/scale": 24_727,
    "router/w": 196_770,
}


def _release_kind(name: str) -> str:
    return next(k for k in RELEASE_FILE_BYTES if name.endswith("/" + k) or name == k)


def test_grok1_preset_reports_the_released_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(capsys, "--preset", "grok-1", "--mesh", "1x8", "--device-memory", "80")
    t = r["totals"]
    assert t["tensors"] == 770 and t["int8_tensors"] == 7 * 64
    assert t["bytes_on_disk"] == 318_239_886_140
    assert (
        round(t["parameters"] / 1e9) == 316 and round(t["active_parameters_per_token"] / 1e9) == 84
    )
    for row in r["tensors"]:
        assert row["file_bytes"] == RELEASE_FILE_BYTES[_release_kind(row["name"])], row["name"]
    emb = r["tensors"][0]
    assert emb["file"] == "ckpt-0/tensor00000_000" and emb["shard_shape"] == [131072, 768]
    expert = next(x for x in r["tensors"] if x["name"].endswith("decoder_layer_0/moe/linear_1/w"))
    assert expert["dtype"] == "int8" and expert["scales_shape"] == [8, 8, 6144]
    assert expert["spec"] == "-, model, -" and expert["shard_shape"] == [8, 4096, 6144]
    assert expert["scales_shard_shape"] == [8, 1, 6144]

    plan = r["plan"]
    # Weights per device: the sharded 1/8 of everything but the replicated norms and routers.
    replicated = sum(x["data_bytes"] for x in r["tensors"] if x["spec"] == "replicated")
    assert plan["weights"] == (t["data_bytes"] - replicated) // 8 + replicated
    assert 37 * GIB < plan["weights"] < 37.1 * GIB
    assert plan["kv_cache"] == 2 * 64 * 8192 * 1 * 128 * 2 + (8192 + 4)  # one kv head per device
    assert plan["device_memory"] == 80 * GIB and plan["fits"] is True
    assert plan["total"] == plan["weights"] + plan["kv_cache"] + plan["working_total"] < 50 * GIB


def test_grok1_plans_for_other_meshes(capsys: pytest.CaptureFixture[str]) -> None:
    two_by_four = run_json(
        capsys, "--preset", "grok-1", "--mesh", "2x4", "--device-memory", "80GiB"
    )
    assert two_by_four["plan"]["fits"] is False  # 1/4 of the weights alone is 74 GiB
    assert two_by_four["plan"]["padded_batch"] == 2
    one_by_sixteen = run_json(
        capsys, "--preset", "grok-1", "--mesh", "1x16", "--device-memory", "40"
    )
    p16 = one_by_sixteen["plan"]
    assert p16["fits"] is True and p16["weights"] < 19 * GIB
    linear_1 = next(x for x in one_by_sixteen["tensors"] if x["name"].endswith("linear_1/w"))
    assert linear_1["scales_spec"] == "replicated"  # 8 scale blocks over 16 row shards
    big_batch = run_json(
        capsys, "--preset", "grok-1", "--mesh", "1x8", "--batch", "64", "--device-memory", "80"
    )
    assert big_batch["plan"]["kv_cache"] > 16 * GIB and big_batch["plan"]["fits"] is False


def test_human_output_has_the_tables_and_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    """Piped (not a terminal), the table keeps its natural width: no path is folded."""
    assert (
        main(
            [
                "inspect",
                "--preset",
                "grok-1",
                "--mesh",
                "1x8",
                "--device-memory",
                "80",
                "--layer",
                "7",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Tensors (12 of 770)" in out and "decoder_layer_7/moe/linear_1/w" in out
    assert "decoder_layer_8/" not in out
    assert "318,239,886,140" in out and "fits" in out and "80.00 GiB" in out
    assert main(["inspect", "--preset", "grok-1", "--mesh", "2x4", "--device-memory", "80"]) == 0
    assert "does not fit" in capsys.readouterr().out


def test_filter_and_layer_select_rows_totals_stay_whole(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(
        capsys,
        "--preset",
        "grok-1",
        "--mesh",
        "1x8",
        "--device-memory",
        "80",
        "--filter",
        r"router/w$",
    )
    assert {x["layer"] for x in r["tensors"]} == set(range(64))
    assert len(r["tensors"]) == 64 and all(x["name"].endswith("router/w") for x in r["tensors"])
    assert r["totals"]["tensors"] == 770 and r["totals"]["selected_tensors"] == 64
    r = run_json(
        capsys,
        "--preset",
        "grok-1",
        "--mesh",
        "1x8",
        "--device-memory",
        "80",
        "--layer",
        "10",
        "--filter",
        "moe",
    )
    assert sorted(x["name"].rsplit("/", 2)[-2] for x in r["tensors"]) == [
        "linear",
        "linear_1",
        "linear_v",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "grok-1", "--filter", "(("], "--filter"),
        (["--preset", "grok-1", "--layer", "64"], "--layer 64"),
        (
            ["--preset", "grok-1", "--mesh", "1x3"],
            "does not divide over mesh axis 'model' of size 3",
        ),
        (["--preset", "grok-1", "--mesh", "1x8", "--device-memory", "lots"], "--device-memory"),
        (["--preset", "grok-1", "--mesh", "1x8", "--seq-len", "9000"], "--seq-len 9000"),
        (["--preset", "grok-1", "--layout", "pipeline"], "--layout"),
        (["--preset", "nope"], "unknown preset"),
        ([], "nothing to inspect"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GROKCTL_CHECKPOINT", raising=False)
    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_checkpoint_is_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nowhere")]) == 4
    assert "not found" in capsys.readouterr().err


def test_rules_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--rules"]) == 0
    out = capsys.readouterr().out
    for pattern, _ in shd.PARAM_RULES:
        assert pattern in out
    assert "kv cache" in out
    r = run_json(capsys, "--rules", "--layout", "expert")
    assert r["layout"] == "expert" and r["rules"][0]["pattern"] == shd.EXPERT_PARALLEL_RULES[0][0]
    assert r["rules"][0]["spec"] == "model, -, -"
    # With a model: how many tensors each rule places (all 770, each by exactly one rule).
    assert (
        main(["inspect", "--preset", "grok-1", "--mesh", "1x8", "--device-memory", "80", "--rules"])
        == 0
    )
    out = capsys.readouterr().out
    assert "257" in out and "192" in out  # norms; query/key/value


# --- a real checkpoint: the index, and agreement with the loader ------------------------------


def test_checkpoint_rows_match_files_and_preset(
    grok_tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from_files = run_json(capsys, str(grok_tiny), "--mesh", "1x8", "--device-memory", "1")
    from_shapes = run_json(capsys, "--preset", "grok-tiny", "--mesh", "1x8", "--device-memory", "1")
    assert from_files["source"] == "checkpoint" and from_shapes["source"] == "preset"
    manifest = {
        t["index"]: t
        for t in json.loads((grok_tiny / "config.json").read_text())["fixture"]["tensors"]
    }
    for a, b in zip(from_files["tensors"], from_shapes["tensors"], strict=True):
        assert a["file_bytes"] == os.path.getsize(grok_tiny / a["file"]) == b["file_bytes"]
        assert a["name"] == b["name"] == manifest[a["index"]]["name"]
        for key in (
            "shape",
            "dtype",
            "scales_shape",
            "data_bytes",
            "spec",
            "shard_shape",
            "device_bytes",
        ):
            assert a[key] == b[key], (a["name"], key)
    assert from_files["totals"] == from_shapes["totals"]
    assert from_files["plan"]["weights"] == from_shapes["plan"]["weights"]


@pytest.mark.parametrize("mesh_text", ["1x8", "2x4"])
def test_shards_and_weights_match_what_the_loader_places(grok_tiny: Path, mesh_text: str) -> None:
    d, m = shd.parse_mesh_shape(mesh_text)
    report = lib.inspect(str(grok_tiny), mesh=(d, m))
    model = grokctl.load_model(grok_tiny, mesh=mesh_text)
    device0 = jax.devices()[0]
    on_device0 = 0
    for t in report.tensors:
        module, leaf = t.name.rsplit("/", 1)
        value = model.engine.params[module][leaf]
        arrays = (
            [(value.weight, t.shard_shape), (value.scales, t.scales_shard_shape)]
            if t.quantized
            else [(value, t.shard_shape)]
        )
        for arr, expected in arrays:
            assert arr.sharding.shard_shape(arr.shape) == tuple(expected), t.name
            on_device0 += sum(s.data.nbytes for s in arr.addressable_shards if s.device == device0)
    assert report.plan.weights == on_device0


def test_memory_plan_against_xla_memory_analysis(grok_tiny: Path) -> None:
    """Weights + KV cache equal the compiled prefill's argument bytes; the working-space
    estimate stays within [0.8x, 3x] of XLA's temporary allocation."""
    model = grokctl.load_model(grok_tiny, mesh="1x8")
    eng = model.engine
    for batch, seq in ((1, 128), (8, 128)):
        compiled = eng.compiled("prefill", batch, seq, tokens=seq)
        stats = compiled.memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        plan = lib.inspect(str(grok_tiny), mesh=(1, 8), batch=batch, seq_len=seq).plan
        args = (
            stats.argument_size_in_bytes - 4 * batch * seq - 2 * 4 * batch
        )  # less tokens, lengths
        assert abs(plan.weights + plan.kv_cache - args) / args < 0.001, (
            plan.weights,
            plan.kv_cache,
            args,
        )
        ratio = plan.working_total / stats.temp_size_in_bytes
        assert 0.8 <= ratio <= 3.0, (batch, seq, plan.working, stats.temp_size_in_bytes)


# --- a full-size stand-in of the release: 770 sparse files, read by the real index -------------


def test_inspect_a_full_size_release_reads_headers_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grokctl.checkpoint.xai.sizes import write_sparse_checkpoint

    write_sparse_checkpoint(tmp_path / "grok-1", preset("grok-1"))
    before = bytes_read()
    r = run_json(capsys, str(tmp_path / "grok-1"), "--mesh", "1x8", "--device-memory", "80")
    after = bytes_read()
    if before is not None and after is not None:  # headers only: not the 318 GB of data
        assert after - before < HEADERS_READ_LIMIT, after - before
    p = run_json(capsys, "--preset", "grok-1", "--mesh", "1x8", "--device-memory", "80")
    assert r["source"] == "checkpoint" and r["totals"] == p["totals"]
    assert r["totals"]["bytes_on_disk"] == 318_239_886_140
    assert [x["file_bytes"] for x in r["tensors"]] == [x["file_bytes"] for x in p["tensors"]]
    assert r["plan"] == p["plan"] and r["plan"]["fits"] is True
