"""`grokctl bench --routing-report DIR` on the grok-tiny fixture: the report counts exactly the
tokens of the timed repetitions (replayed untimed after each case), one report per MoE kernel,
a bad DIR is refused before loading, and nothing recompiles per repetition."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

import grokctl
from grokctl import bench, routing
from tests.helpers import one_line_error
from tests.test_bench import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fed_tokens(records: list[dict]) -> int:
    """Tokens the timed repetitions fed the model: pp<P> feeds B x P a repetition, tg<N> feeds
    B x N (the random first token and N - 1 sampled ones fed back)."""
    return sum(r["batch"] * (r["n_prompt"] + r["n_gen"]) * r["reps"] for r in records)


def check_report(out: Path, tokens: int, moe: str) -> dict:
    doc = json.loads((out / routing.JSON_NAME).read_text())
    assert doc["schema"] == routing.SCHEMA and doc["tokens"] == tokens
    assert doc["invariants"]["ok"] is True
    assert doc["invariants"]["token_layers_checked"] == tokens * doc["layers"]
    for layer in doc["per_layer"]:
        assert layer["tokens"] == tokens and sum(layer["counts"]) == tokens * doc["top_k"]
    assert doc["meta"]["command"] == "bench" and doc["meta"]["moe"] == moe
    for name in doc["files"].values():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*"))  # no temporary file left behind
    return doc


def test_routing_report_counts_every_timed_token(grok_tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "rr"
    r = cli(str(grok_tiny), "-p", "16", "-n", "4", "-r", "1", "-o", "json",
            "--routing-report", str(out))  # fmt: skip
    assert r.code == 0, r.err
    records = json.loads(r.out)  # stdout: the records only
    assert fed_tokens(records) == 16 + 4
    doc = check_report(out, 16 + 4, "sparse")
    assert doc["layers"] == 2 and doc["experts"] == 8
    for rec in records:
        assert rec["routing"] == {
            "report": str(out / "routing.json"),
            "tokens": rec["batch"] * (rec["n_prompt"] + rec["n_gen"]) * rec["reps"],
            "invariants_ok": True,
        }
    assert "routing: 20 tokens" in r.err and "load CV" in r.err  # the summary, on stderr
    assert "routing-load.png" in r.err


def test_routing_report_per_kernel(grok_tiny: Path, tmp_path: Path) -> None:
    """Both kernels: DIR/sparse and DIR/dense, each counting its own case (batch 2, 2 reps)."""
    out = tmp_path / "rr"
    r = cli(str(grok_tiny), "-p", "0", "-n", "4", "-b", "2", "-r", "2", "--moe", "sparse,dense",
            "-o", "csv", "--routing-report", str(out))  # fmt: skip
    assert r.code == 0, r.err
    rows = list(csv.DictReader(io.StringIO(r.out)))
    assert [(x["test"], x["moe"]) for x in rows] == [("tg4", "sparse"), ("tg4", "dense")]
    for moe in ("sparse", "dense"):
        mine = [x for x in rows if x["moe"] == moe]
        assert {x["routing.report"] for x in mine} == {str(out / moe / "routing.json")}
        assert [int(x["routing.tokens"]) for x in mine] == [2 * 4 * 2]
        assert all(x["routing.invariants_ok"] == "True" for x in mine)
        check_report(out / moe, 2 * 4 * 2, moe)
    assert not (out / routing.JSON_NAME).exists()
    assert "--moe sparse" in r.err and "--moe dense" in r.err


@pytest.mark.parametrize("moe", ["sparse", "sparse,dense"])
def test_unwritable_report_dir_exits_4_before_loading(
    grok_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moe: str
) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded before the report directory was checked")

    monkeypatch.setattr(grokctl, "load_model", no_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # one kernel: DIR under a file; both kernels: DIR/dense is a file
    (tmp_path / "rr").mkdir()
    (tmp_path / "rr" / "dense").write_text("")
    bad = blocker / "sub" if moe == "sparse" else tmp_path / "rr"
    r = cli(str(grok_tiny), "-p", "16", "-n", "4", "-r", "1", "--moe", moe,
            "--routing-report", str(bad))  # fmt: skip
    assert r.code == 4, r.err
    assert "--routing-report" in one_line_error(r) and r.out == ""


def test_timed_reps_run_without_collection_and_nothing_recompiles(grok_tiny: Path) -> None:
    """Per kernel: the routing pass compiles its variant once; a second run of the same cases
    with more repetitions compiles nothing, the timed repetitions never collect, and the
    counts equal a direct forward of the same prompts."""
    model = grokctl.load_model(grok_tiny, mesh="2x4")
    seed = 3
    runner = bench.Runner(model.engine, seed, routing=True)
    cases = [bench.Case("pp", 16, 0, 2, "sparse"), bench.Case("tg", 3, 4, 2, "dense")]

    def on_rep(case: bench.Case, done: int, of: int) -> None:
        assert not runner.engine_for(case.moe).collecting_routing  # timed: plain programs

    for case in cases:
        runner.run(case, reps=1, on_rep=on_rep)
    engines = [runner.engine_for(m) for m in ("sparse", "dense")]
    before = [(e.programs, e.compile_count) for e in engines]
    for case in cases:
        result = runner.run(case, reps=3, on_rep=on_rep)
        assert result.routing is not None and result.compile_s == 0.0
        assert result.routing.num_tokens == case.batch * case.tokens * 3
        assert result.routing.invariants_ok()
    assert [(e.programs, e.compile_count) for e in engines] == before

    # The replay routes the very prompts the timed repetitions ran: the runner's random
    # stream (warm-up prompt, then one prompt a repetition) reproduced, forwarded directly.
    fresh = bench.Runner(model.engine, seed, routing=True)
    result = fresh.run(cases[0], reps=2)
    rng = np.random.default_rng(seed)
    draw = [rng.integers(3, model.config.vocab_size, (2, 16)).astype(np.int32) for _ in range(3)]
    direct = model.routing_stats(draw[1]) + model.routing_stats(draw[2])
    assert result.routing is not None
    np.testing.assert_array_equal(result.routing.counts, direct.counts)
    np.testing.assert_array_equal(result.routing.coactivation, direct.coactivation)
    np.testing.assert_allclose(result.routing.gate_mass, direct.gate_mass, rtol=1e-5)
