"""`grokctl quantize` end to end on the golden fixture: release -> native int8 is lossless (identical
logits, the golden scorer passes), release -> int4 holds measured agreement figures; bad input;
a quantize killed with SIGKILL leaves nothing that looks complete and a rerun finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import grokctl
from grokctl import quantize as q
from grokctl.cli.app import main
from tests.golden import assert_rule1
from tests.helpers import REPO
from tests.helpers import grokctl as run_cli
from tests.test_golden import CASES

# int4 (group 128, clipping search over 5-bit scales) on grok-tiny against its int8 source,
# measured (docs/quantize.md): top-1 0.654, KL mean 0.318 / max 4.70, max |dlogit| 9.13; per
# tensor relative RMS 0.102 .. 0.129. (The fixture's random weights make it far more sensitive
# than a trained model: int4 of the same model computed from the dequantized values as plain bf16
# arrays gives identical logits, so these figures are the quantization's, not the kernel's.) Max
# |dlogit| and greedy agreement are tails of a chaotic process here: over 40 probes the previous
# quantizer (8-bit scales) measured max |dlogit| 10.3 and greedy token agreement 0.14, this one
# 9.8 and 0.10 (first greedy token: 0.675 both), while on these 4 probes greedy agreement reads
# 0.31 vs 0.05 — it is reported, not held to a threshold. The thresholds leave a margin over the
# measured values; a wrong packing or scale scores far outside them.
INT4_MIN_TOP1 = 0.60
INT4_MAX_KL_MEAN = 0.35
INT4_MAX_KL_MAX = 5.5
INT4_MAX_DLOGIT = 11.0
INT4_MAX_REL_RMS = 0.14


@pytest.fixture(scope="module")
def one_device():  # type: ignore[no-untyped-def]
    import jax

    from grokctl.model.sharding import make_mesh

    return make_mesh("1x1", jax.devices()[:1])


@pytest.fixture(scope="module")
def int8_dst(grok_tiny: Path, tmp_path_factory: pytest.TempPathFactory, one_device) -> Path:  # type: ignore[no-untyped-def]
    dst = tmp_path_factory.mktemp("q8") / "tiny-int8"
    q.quantize(grok_tiny, dst, q.Options(bits=8), eval_mesh=one_device)
    return dst


@pytest.fixture(scope="module")
def int4_dst(grok_tiny: Path, tmp_path_factory: pytest.TempPathFactory, one_device) -> Path:  # type: ignore[no-untyped-def]
    dst = tmp_path_factory.mktemp("q4") / "tiny-int4"
    q.quantize(grok_tiny, dst, q.Options(bits=4), eval_mesh=one_device)
    return dst


def _report(dst: Path) -> dict:
    return json.loads((dst / q.REPORT_NAME).read_text())


def test_int8_repack_is_lossless(grok_tiny: Path, int8_dst: Path, one_device) -> None:  # type: ignore[no-untyped-def]
    from grokctl.checkpoint.index import CheckpointIndex

    src, dst = CheckpointIndex.open(grok_tiny), CheckpointIndex.open(int8_dst)
    assert dst.format == "native"
    for a, b in zip(src, dst):
        va, vb = a.load(), b.load()
        if isinstance(va, tuple):
            assert isinstance(vb, tuple)
            assert np.array_equal(va[0], vb[0]) and np.array_equal(
                va[1].view(np.uint16), vb[1].view(np.uint16)
            )
        else:
            assert np.array_equal(va, vb)
    m_src = grokctl.load_model(grok_tiny, mesh=one_device)
    m_dst = grokctl.load_model(int8_dst, mesh=one_device)
    golden = dict(np.load(grok_tiny / "golden.npz"))
    acc = json.loads((grok_tiny / "config.json").read_text())["fixture"]["acceptance"]
    pairs = []
    for case in CASES:
        toks = golden[f"tokens_{case}"][None]
        got = m_dst.logits(toks)[0]
        assert np.array_equal(got, m_src.logits(toks)[0])  # bit-identical
        valid = golden[f"valid_{case}"]
        pairs.append((got[valid], golden[f"logits_{case}"][valid]))
    assert_rule1(pairs, acc)
    rep = _report(int8_dst)
    e2e = rep["end_to_end"]
    assert e2e["top1_agreement"] == 1.0 and e2e["kl_max"] == 0.0
    assert e2e["max_abs_logit_delta"] == 0.0 and e2e["greedy_token_agreement"] == 1.0
    assert e2e["positions"] >= 256
    assert all(t["rel_rms_error"] == 0.0 and t["max_abs_error"] == 0.0 for t in rep["tensors"])
    assert {t["method"] for t in rep["tensors"]} == {"repack", "copy"}
    assert (int8_dst / "tokenizer.model").exists() == (grok_tiny / "tokenizer.model").exists()


def test_int4_report_holds_the_measured_thresholds(int4_dst: Path) -> None:
    rep = _report(int4_dst)
    assert rep["bits"] == 4 and rep["group_size"] == 128
    e2e = rep["end_to_end"]
    assert e2e["top1_agreement"] >= INT4_MIN_TOP1, e2e
    assert e2e["kl_mean"] <= INT4_MAX_KL_MEAN and e2e["kl_max"] <= INT4_MAX_KL_MAX, e2e
    assert e2e["max_abs_logit_delta"] <= INT4_MAX_DLOGIT, e2e
    assert 0.0 <= e2e["greedy_prefix_agreement"] <= e2e["greedy_token_agreement"] <= 1.0, e2e
    quant = [t for t in rep["tensors"] if t["kind"] == "int4"]
    assert len(quant) == 14
    assert all(0.05 < t["rel_rms_error"] <= INT4_MAX_REL_RMS for t in quant), quant
    assert any(t["method"] == "clip-search" for t in quant)
    # K = 176 (the fixture's ffn size): 128 does not divide it, 88 does.
    fallbacks = {f["name"]: f["group_size"] for f in rep["group_size_fallbacks"]}
    assert fallbacks == {f"transformer/decoder_layer_{i}/moe/linear_1/w": 88 for i in (0, 1)}
    scheme = json.loads((int4_dst / "config.json").read_text())["quantization"]
    assert scheme["bits"] == 4 and scheme["group_size"] == 128


def test_evaluate_only_scores_an_existing_dst(grok_tiny: Path, int4_dst: Path, one_device) -> None:  # type: ignore[no-untyped-def]
    rep = q.evaluate(grok_tiny, int4_dst, mesh=one_device)
    written = _report(int4_dst)
    assert rep["end_to_end"] == written["end_to_end"]
    by_name = {t["name"]: t for t in written["tensors"]}
    for t in rep["tensors"]:
        w = by_name[t["name"]]
        assert t["kind"] == w["kind"] and t["group_size"] == w["group_size"]
        assert t["rel_rms_error"] == pytest.approx(w["rel_rms_error"], rel=1e-5, abs=1e-9)
        assert t["max_abs_error"] == pytest.approx(w["max_abs_error"], rel=1e-6, abs=1e-9)
    assert rep["group_size_fallbacks"] == written["group_size_fallbacks"]


def test_cli_int4_with_int8_embeddings(
    grok_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "out"
    args = ["quantize", str(grok_tiny), str(dst), "--bits", "4", "--group-size", "64"]
    code = main([*args, "--embeddings", "int8", "--no-eval", "--json"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(capsys.readouterr().out)
    assert rep == _report(dst)
    assert rep["group_size"] == 64 and rep["group_size_fallbacks"] == [
        {
            "name": f"transformer/decoder_layer_{i}/moe/linear_1/w",
            "contracting": 176,
            "group_size": 44,
        }
        for i in (0, 1)
    ]
    emb = next(t for t in rep["tensors"] if t["name"] == q.EMBED_NAME)
    assert emb["kind"] == "emb-int8" and 0 < emb["rel_rms_error"] < 0.01
    assert rep["end_to_end"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    # Exists now: refused without --force, replaced with it.
    assert main([*args, "--no-eval"]) == 2
    assert "exists (use --force" in capsys.readouterr().err
    assert main([*args, "--no-eval", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- bad input ---------------------------------------------------------------------------------


def _no_output(parent: Path, name: str = "dst") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(name)]


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--bits", "3"], 2, "--bits 3: supported are 8 and 4"),
        (["--bits", "16"], 2, "--bits 16"),
        (["--group-size", "1"], 2, "--group-size 1: must be >= 2"),
        (["--group-size", "0"], 2, "--group-size 0"),
        (["--embeddings", "fp8"], 2, "--embeddings 'fp8'"),
    ],
)
def test_bad_flags_exit_2(
    grok_tiny: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    code: int,
    message: str,
) -> None:
    assert main(["quantize", str(grok_tiny), str(tmp_path / "dst"), *extra]) == code
    err = capsys.readouterr().err
    assert err.count("grokctl: error:") == 1 and message in err and "Traceback" not in err
    _no_output(tmp_path)


def test_source_in_neither_format_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"\0" * 64)
    assert main(["quantize", str(src), str(tmp_path / "dst")]) == 4
    err = capsys.readouterr().err
    assert err.count("grokctl: error:") == 1 and f"{src}: no ckpt-0/" in err
    _no_output(tmp_path)


def test_existing_destination_needs_force(
    grok_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["quantize", str(grok_tiny), str(dst), "--bits", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("grokctl: error:") == 1 and f"{dst} exists" in err
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["quantize", str(grok_tiny), str(grok_tiny), "--force"]) == 2
    assert "is the source" in capsys.readouterr().err


def test_not_enough_disk_exit_4_before_writing(
    grok_tiny: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = q.shutil.disk_usage

    def small_disk(path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
        u = real(path)
        return type(u)(u.total, u.total - 1_000_000, 1_000_000)  # 1 MB free

    monkeypatch.setattr(q.shutil, "disk_usage", small_disk)
    assert main(["quantize", str(grok_tiny), str(tmp_path / "dst"), "--bits", "8"]) == 4
    err = capsys.readouterr().err
    assert err.count("grokctl: error:") == 1 and "1.00 MB free" in err and "needs" in err
    _no_output(tmp_path)


# --- killed mid-run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_run_leaves_nothing_complete_and_a_rerun_finishes(
    demo_ckpt: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "demo-int4"
    args = [sys.executable, "-m", "grokctl", "quantize", str(demo_ckpt), str(dst)]
    args += ["--bits", "4", "--no-eval"]
    env = {**os.environ, "GROKCTL_DEBUG": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        part = None
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = [p for p in tmp_path.iterdir() if p.name.startswith("demo-int4.tmp-")]
            parts = [f for t in tmps for f in t.iterdir() if f.name.endswith(".part")]
            if parts and parts[0].stat().st_size > 0:
                part = parts[0]
                break
            time.sleep(0.01)
        assert part is not None, "quantize finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("demo-int4.tmp-")]
    assert len(leftovers) == 1 and not (leftovers[0] / "model.safetensors.index.json").exists()

    rerun = run_cli("quantize", str(demo_ckpt), str(dst), "--bits", "4", "--no-eval", "--json")
    assert rerun.code == 0, rerun.err
    assert "interrupted run" in rerun.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-int4"]
    verify = run_cli("verify", str(dst))
    assert verify.code == 0, verify.out + verify.err
    report = json.loads(rerun.out)
    assert report == _report(dst) and len(report["tensors"]) == 2 + 2 * 12


def test_native_source_gives_the_same_int4_as_the_release(
    grok_tiny: Path, int8_dst: Path, tmp_path: Path
) -> None:
    """A native int8 checkpoint holds the release's values: quantizing it to int4 gives the same
    bytes as quantizing the release (the source format is read through CheckpointIndex)."""
    from grokctl.checkpoint.index import CheckpointIndex

    a = q.quantize(grok_tiny, tmp_path / "a", q.Options(bits=4), evaluate_model=False)
    b = q.quantize(int8_dst, tmp_path / "b", q.Options(bits=4), evaluate_model=False)
    assert b.plan.source_format == "native" and a.plan.source_format == "xai"
    ia, ib = CheckpointIndex.open(tmp_path / "a"), CheckpointIndex.open(tmp_path / "b")
    for ea, eb in zip(ia, ib):
        va, vb = ea.load(), eb.load()
        pairs = zip(va, vb) if isinstance(va, tuple) else [(va, vb)]
        for x, y in pairs:
            assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))
    assert [t.to_json() for t in a.tensors] == [t.to_json() for t in b.tensors]


def test_a_failed_evaluation_keeps_the_complete_checkpoint(grok_tiny: Path, tmp_path: Path) -> None:
    """Quantizing Grok-1 takes long; an evaluation that cannot run (here: a mesh of 9 devices)
    does not throw the checkpoint away: the report says why, --evaluate-only can score it later."""
    logs: list[str] = []
    res = q.quantize(
        grok_tiny, tmp_path / "out", q.Options(bits=8), eval_mesh="3x3", log=logs.append
    )
    rep = _report(tmp_path / "out")
    assert res.end_to_end is None and rep["end_to_end"] is None
    assert "--mesh 3x3" in rep["end_to_end_error"] and "--evaluate-only" in logs[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
