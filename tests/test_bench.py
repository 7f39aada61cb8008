"""`grokctl bench` on the grok-tiny fixture (8 virtual CPU devices, -r 1): records, formats,
--compare, --plot and bad input. Speed is recorded, never asserted."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from grokctl import bench, costmodel
from grokctl.checkpoint.index import CheckpointIndex
from grokctl.cli.app import main
from tests.helpers import REPO, Run, one_line_error

CASES = ["-p", "16", "-n", "4", "-b", "1", "-r", "1"]


def cli(*args: str) -> Run:
    """The real entry point, in process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["bench", *args])
    return Run(code, out.getvalue(), err.getvalue())


def documented_fields() -> list[str]:
    """The first column of docs/bench.md's record field table."""
    text = (REPO / "docs" / "bench.md").read_text()
    table = text.split("## Record fields", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_0-9.]+)` +\|", table, flags=re.M)


@pytest.fixture(scope="module")
def run(grok_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """One run of two cases (pp16, tg4) on the default 1x8 mesh, -o json, also --save'd."""
    path = tmp_path_factory.mktemp("bench") / "base.json"
    r = cli(str(grok_tiny), *CASES, "-o", "json", "--save", str(path))
    assert r.code == 0, r.err
    printed = json.loads(r.out)
    assert json.loads(path.read_text()) == printed
    return printed, path


def test_records_carry_every_documented_field(run: tuple[list[dict], Path]) -> None:
    records, _ = run
    fields = documented_fields()
    assert len(fields) > 40
    for r in records:
        flat = {k for k in r} | {f"{k}.{s}" for k, v in r.items() if isinstance(v, dict) for s in v}
        assert set(fields) <= flat, set(fields) - flat
        assert {k for k in r} <= set(fields), {k for k in r} - set(fields)  # nothing undocumented
        assert r["schema"] == bench.SCHEMA
        assert r["reps"] == 1 and len(r["tok_s"]) == 1 and r["tok_s_mean"] > 0
        assert r["mesh"] == "1x8" and r["device_count"] == 8 and r["backend"] == "cpu"
        assert r["model"]["name"] == "grok-tiny" and r["precision"]["weights"] == "int8"
        assert set(r["versions"]) >= {"jax", "jaxlib", "dm-haiku", "numpy"}
        assert r["commit"] and r["hardware"]["cores_logical"] >= 1
        assert r["mem_bw_gb_s"] > 0 and r["matmul_peak_flop_s"]["float32"] > 0
        assert len(r["mem_bw_probes_gb_s"]) == 2  # before and after the cases: the best counts
        assert r["mem_bw_gb_s"] == max(r["mem_bw_probes_gb_s"])
    pp, tg = records
    assert (pp["test"], pp["n_prompt"], tg["test"], tg["n_gen"]) == ("pp16", 16, "tg4", 4)
    assert pp["ttft_ms"] is not None and pp["token_ms"] is None and pp["weight_gb_s"] is None
    assert tg["ttft_ms"] is None and set(tg["token_ms"]) == {"p50", "p90", "p99"}
    assert tg["roofline_pct"] == pytest.approx(100 * tg["weight_gb_s"] / tg["mem_bw_gb_s"], 0.01)


def test_records_name_the_cpu_kernels_that_ran(
    run: tuple[list[dict], Path], grok_tiny: Path
) -> None:
    """`kernels`: null on a mesh (XLA's paths); on one CPU device the kernels' info (ISA,
    threads, how batch 1's int8 logits are summed), also on the md build line."""
    import jax

    from grokctl import kernels
    from grokctl.model.sharding import make_mesh

    assert all(r["kernels"] is None for r in run[0])
    one = make_mesh("1x1", jax.devices()[:1])
    spec = bench.BenchSpec(prompts=(4,), gens=(2,), reps=1)
    pp, tg = bench.run_bench(grok_tiny, spec, mesh=one).records
    want = kernels.info() if kernels.available() else None
    assert pp["kernels"] == tg["kernels"] == want
    md = bench.render([tg], "md")
    note = f"cpu kernels {want['isa']}, {want['threads']} threads" if want else "cpu kernels"
    assert (note in md) == (want is not None)


def test_md_renders_records_saved_before_the_two_probes(run: tuple[list[dict], Path]) -> None:
    """A record without `mem_bw_probes_gb_s` (saved by an earlier grokctl) renders, with its one
    probe; with both, the build line names them."""
    old = [{k: v for k, v in r.items() if k != "mem_bw_probes_gb_s"} for r in run[0]]
    assert "best of" not in bench.render(old, "md")
    assert "before /" in bench.render(run[0], "md")


def test_weight_bytes_are_the_cost_models_count_from_the_index(
    run: tuple[list[dict], Path], grok_tiny: Path
) -> None:
    records, _ = run
    index = CheckpointIndex.open(grok_tiny)
    want = costmodel.decode_weight_bytes(
        index.config, 1, tensors=costmodel.roofline_tensor_bytes(index)
    )
    v, d = index.config.vocab_size, index.config.emb_size
    # the f32 table counts as what an int8 model must read: one byte a value (+ a row scale)
    assert want.parts["unembed"] == v * d + 2 * v
    stored = costmodel.decode_weight_bytes(
        index.config, 1, tensors=costmodel.index_tensor_bytes(index)
    )
    assert stored.parts["unembed"] == 4 * v * d
    assert stored.per_step - want.per_step == (4 * v * d - v * d - 2 * v) * (1 + 1 / v)
    for r in records:
        assert r["weight_bytes_per_step"] == want.per_step
        assert r["weight_bytes_parts"] == want.parts
    tg = records[1]
    steps_per_s = tg["tok_s_mean"] / tg["batch"]
    assert tg["weight_gb_s"] == pytest.approx(want.per_step * steps_per_s / 1e9, rel=1e-3)


def test_other_formats_render_the_same_records(run: tuple[list[dict], Path]) -> None:
    records, _ = run
    lines = bench.render(records, "jsonl").splitlines()
    assert [json.loads(x) for x in lines] == records
    rows = list(csv.DictReader(io.StringIO(bench.render(records, "csv"))))
    assert [r["test"] for r in rows] == ["pp16", "tg4"]
    assert float(rows[1]["tok_s_mean"]) == records[1]["tok_s_mean"]
    assert rows[0]["model.name"] == "grok-tiny"
    md = bench.render(records, "md").splitlines()
    assert md[0].startswith("| model") and "t/s" in md[0]
    assert md[2].startswith("| grok-tiny int8") and "pp16" in md[2] and "tg4" in md[3]
    assert any(line.startswith("build: ") for line in md)


def test_compare_on_itself_is_all_ones(run: tuple[list[dict], Path]) -> None:
    records, path = run
    rows, regressed = bench.compare(bench.load_records(path), records, 0.1)
    assert [r["ratio"] for r in rows] == [1.0, 1.0] and not regressed


def test_compare_exit_codes(run: tuple[list[dict], Path], grok_tiny: Path, tmp_path: Path) -> None:
    records, _ = run
    slow = [{**r, "tok_s_mean": r["tok_s_mean"] / 100} for r in records]
    fast = [{**r, "tok_s_mean": r["tok_s_mean"] * 100} for r in records]
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    (tmp_path / "fast.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fast))
    pp_only = [*CASES, "-n", "0"]  # one case: this test times nothing it does not need
    ok = cli(str(grok_tiny), *pp_only, "--compare", str(tmp_path / "slow.json"))
    assert ok.code == 0, ok.err
    assert "compare (regression when ratio < 0.90)" in ok.out and "REGRESSED" not in ok.out
    bad = cli(str(grok_tiny), *pp_only, "-o", "jsonl", "--compare", str(tmp_path / "fast.jsonl"))
    assert bad.code == 1
    assert "1 of 1 cases regressed past --tolerance 0.1" in one_line_error(bad)
    assert [json.loads(x)["test"] for x in bad.out.splitlines()] == ["pp16"]
    assert "REGRESSED" in bad.err


def test_compare_refuses_another_schema_or_model(
    run: tuple[list[dict], Path], grok_tiny: Path, tmp_path: Path
) -> None:
    records, _ = run
    other_schema = [{**r, "schema": "llama-bench"} for r in records]
    other_model = [{**r, "model": {**r["model"], "id": "0" * 16, "name": "big"}} for r in records]
    for name, data, needle in (
        ("schema.json", other_schema, "schema 'llama-bench'"),
        ("model.json", other_model, "another model (big:"),
        ("junk.json", "not json {", "not bench JSON"),
    ):
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else json.dumps(data))
        r = cli(str(grok_tiny), *CASES, "--compare", str(p))
        assert r.code == 2, r.err
        assert needle in one_line_error(r) and r.out == ""


def test_plot_draws_a_png(run: tuple[list[dict], Path], tmp_path: Path) -> None:
    records, _ = run
    two_batches = records + [{**r, "batch": 8, "tok_s_mean": 2 * r["tok_s_mean"]} for r in records]
    bench.plot(two_batches, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
    # a panel for each axis that varies: batch only here, batch and depth below
    deeper = two_batches + [{**r, "depth": 64} for r in two_batches]
    bench.plot(deeper, tmp_path / "bd.png")

    def width(name: str) -> int:  # from the PNG's IHDR chunk
        return int.from_bytes((tmp_path / name).read_bytes()[16:20], "big")

    assert width("bd.png") > 1.8 * width("b.png")


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["-p", "abc"], 2, "-p 'abc'"),
        (["-d", "-1"], 2, "-d '-1'"),
        (["-d", "120"], 2, "beyond the model's context of 128"),
        (["-b", "3", "--mesh", "2x4"], 2, "-b 3"),
        (["-r", "0"], 2, "-r '0'"),
        (["-p", "0", "-n", "0"], 2, "nothing to run"),
        (["--moe", "magic"], 2, "magic"),
        (["-o", "xml"], 2, "-o 'xml'"),
        (["--plot", "/nonexistent/dir/x.png"], 4, "--plot /nonexistent/dir/x.png"),
        (["--save", "{tmp}"], 4, "--save"),
        (["--compare", "/nonexistent/old.json"], 4, "/nonexistent/old.json"),
    ],
)
def test_bad_input_is_one_line(
    grok_tiny: Path, tmp_path: Path, args: list[str], code: int, needle: str
) -> None:
    r = cli(str(grok_tiny), *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.code == code, r.err
    assert needle in one_line_error(r)


def test_no_checkpoint_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GROKCTL_CHECKPOINT", raising=False)
    r = cli()
    assert r.code == 2 and "no checkpoint" in one_line_error(r)


def test_runner_reuses_its_programs_across_runs(grok_tiny: Path) -> None:
    """Warm-up compiles; the timed repetitions and a second run of the case compile nothing."""
    import grokctl

    model = grokctl.load_model(grok_tiny, mesh="2x4")
    runner = bench.Runner(model.engine)
    case = bench.Case("tg", 3, 4, 2, "sparse")
    first = runner.run(case, reps=2)
    programs = model.engine.programs
    second = runner.run(case, reps=2)
    assert model.engine.programs == programs and second.compile_s == 0.0
    assert first.compile_s > 0 and len(first.token_s) == 2 * 3 and len(first.tok_s) == 2


@pytest.mark.parametrize("k", [1, 4])
def test_pipelined_tg_feeds_what_one_step_at_a_time_samples(grok_tiny: Path, k: int) -> None:
    """tg dispatches call c+1 (k decode steps) before fetching call c's tokens: the tokens it
    feeds are those a step-at-a-time loop from the same cache samples, and it times one interval
    per step (6 steps: calls of 4 and 2 at k = 4)."""
    import grokctl

    model = grokctl.load_model(grok_tiny, mesh="2x4")
    eng = model.engine
    runner = bench.Runner(eng, seed=5, decode_steps=k)
    case = bench.Case("tg", 6, 3, 2, "sparse")
    cache = runner._fill(eng, case)
    times, fed = runner._tg(eng, case, runner._copy(cache), 6)
    assert fed.shape == (2, 6) and len(times) == 6 and all(t > 0 for t in times)
    assert (times[0] == times[3]) == (k == 4)  # one call's time shared by its steps
    tok, cache = fed[:, 0], runner._copy(cache)
    for step in range(1, 6):
        logits, cache = eng.decode(tok, cache)
        tok = eng.fetch(eng.sample(logits, runner._rows(2), step - 1))
        np.testing.assert_array_equal(tok, fed[:, step])
