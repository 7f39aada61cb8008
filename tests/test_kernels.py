"""The native CPU kernels (grokctl/kernels): numerics against the pure-JAX path on every ISA this
CPU has, odd shapes, the expert-indexed and logits variants, the wiring into qmatmul, and the
fallback when the kernels are disabled or cannot be built."""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokctl import kernels
from grokctl.model import quant
from grokctl.model.quant import QuantizedWeight8bit, chunked_qmatmul, dequantize
from grokctl.quantizers.int8 import quantize_int8

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="CPU kernels unavailable (no compiler?)"
)

ISAS = ["scalar", "avx2", "avx512", "avx512_bf16", "avx512_vnni", "amx"]


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Cap the kernel's ISA (read per call); skip what this CPU lacks."""
    order = {name: i for i, name in enumerate(ISAS)}
    monkeypatch.delenv("GROKCTL_CPU_ISA", raising=False)
    monkeypatch.delenv("GROKCTL_CPU_LOGITS", raising=False)
    best = kernels.info()["isa"]
    if order[request.param] > order[best]:
        pytest.skip(f"CPU has {best} only")
    if request.param != ISAS[-1]:
        monkeypatch.setenv("GROKCTL_CPU_ISA", request.param)
    if order[request.param] >= order["avx512_vnni"]:
        # every VNNI path, also where batch 1's logits default to f32 (AMD Zen 5)
        monkeypatch.setenv("GROKCTL_CPU_LOGITS", "vnni")
    assert kernels.info()["isa"] == request.param
    return str(request.param)


def _quantized(rng: np.random.Generator, k: int, n: int, g: int, e: int = 0) -> QuantizedWeight8bit:
    shape = (e, k, n) if e else (k, n)
    q = quantize_int8(rng.standard_normal(shape).astype(np.float32), g)
    return QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))


def _check(got: jax.Array, x: jax.Array, wd: jax.Array) -> None:
    """got == x @ wd up to f32 summation-order error: |err| <= K u sum_k |x_k w_kn| (any order)."""
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    wf = np.asarray(wd.astype(jnp.float32), np.float64)
    ref = xf @ wf
    bound = xf.shape[-1] * 2.0**-24 * (np.abs(xf) @ np.abs(wf)) + 1e-30
    err = np.abs(np.asarray(got, np.float64) - ref)
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    assert np.all(err <= bound), float(np.max(err / bound))


@pytest.mark.parametrize(
    ("m", "k", "n", "g"),
    [
        (1, 256, 512, 8),
        (3, 64, 100, 2),
        (5, 128, 37, 4),
        (9, 96, 300, 1),
        (1, 24, 7, 3),
        (14, 72, 70, 3),
        (2, 30, 40, 10),  # odd rows per scale group: no row pairs (the plain AVX-512 loop)
        (1, 600, 50, 2),  # several row slabs, a group boundary inside one (partial sums)
        (3, 4104, 33, 6),  # 16 slabs of 264 rows + tail
        (32, 600, 130, 3),  # a decode step at batch 32: eight 4-row blocks, several slabs
        (64, 96, 70, 2),  # batch 64, KERNEL_MAX_M
        (1, 256, 1024, 2),  # rows of 1 KB: passes over rows a page apart (page_rows), 4 a block
        (3, 320, 640, 1),  # 7 rows a page: 5 blocks of 56 rows, then 40 rows 8 at a time
        # AMX (bf16 x from 8 rows, f32 from 16): slabs of 256 rows across groups of 320, a
        # partial column tile; three row tiles (the last partial); five (4 + 1)
        (8, 640, 70, 2),
        (40, 1024, 96, 4),
        (72, 256, 50, 1),
        # a prompt's expert block (from 32 rows the AMX units take every weight row): nine row
        # tiles, the last of two rows, five scale groups, four column chunks
        (130, 640, 200, 5),
        # one scale group, written straight to y (a partial last column tile); x's tiles laid out
        # by the threads together (f32 x: 688K elements)
        (100, 2048, 40, 1),
    ],
)
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16])
def test_qmatmul_matches_exact_dequant_dot(
    isa: str, m: int, k: int, n: int, g: int, xdtype
) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(m * 1000 + n)
    w = _quantized(rng, k, n, g)
    x = jnp.asarray(rng.standard_normal((m, k)), xdtype)
    got = jax.jit(kernels.qmatmul)(x, w.weight, w.scales)
    _check(got, x, dequantize(w))  # bf16-rounded int8 * scale, as the reference


def _quantized4(
    rng: np.random.Generator, k: int, n: int, g: int, e: int = 0, scales: str = "bf16"
) -> quant.QuantizedWeight:
    """Random packed int4 with bf16 scales: any bf16 ("bf16": each weight is rounded to bf16),
    of 5 significant bits as quantize writes them ("exact": nibble x scale is a bf16 value, the
    kernels' unscaled-sum path), or "mixed": exact groups, a zero column and one group of any
    bf16 scales (a unit takes both paths)."""
    from grokctl.checkpoint.native.format import pack_int4

    shape = (e, k, n) if e else (k, n)
    q = rng.integers(-8, 8, shape).astype(np.int8)
    s = rng.uniform(0.01, 0.1, (*shape[:-2], g, n)).astype(np.float32)
    if scales != "bf16":
        bits = s.view(np.uint32) & np.uint32(0xFFF80000)  # 1 + 4 mantissa bits
        s5 = bits.view(np.float32)
        if scales == "mixed":
            s5[..., -1] = 0.0
            s5[..., g // 2, : n // 2] = s[..., g // 2, : n // 2]
        s = s5
    return quant.QuantizedWeight(jnp.asarray(pack_int4(q)), jnp.asarray(s, jnp.bfloat16), bits=4)


@pytest.mark.parametrize(
    ("m", "k", "n", "g"),
    [
        (1, 256, 512, 2),
        (3, 64, 100, 4),
        (5, 128, 37, 8),
        (9, 96, 300, 1),
        (2, 600, 50, 3),
        (1, 4104, 24, 6),
        (1, 256, 1024, 2),  # packed rows of 1 KB taken a page apart (page_rows)
        (2, 512, 512, 2),  # 8 packed rows a page: one block of 64 rows a pass set
    ],
)
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scales", ["bf16", "exact", "mixed"])
def test_qmatmul4_matches_exact_dequant_dot(
    isa: str, m: int, k: int, n: int, g: int, xdtype, scales: str
) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(m * 77 + n)
    w = _quantized4(rng, k, n, g, scales=scales)
    x = jnp.asarray(rng.standard_normal((m, k)), xdtype)
    got = jax.jit(kernels.qmatmul4)(x, w.weight, w.scales)
    _check(got, x, dequantize(w))  # nibble x scale rounded to bf16, as the XLA path


def test_qmatmul4_expert_index_and_wiring() -> None:
    rng = np.random.default_rng(5)
    w = _quantized4(rng, 64, 40, 2, e=3)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    fn = jax.jit(kernels.qmatmul4)
    for e in range(3):
        one = quant.QuantizedWeight(w.weight[e], w.scales[e], bits=4)
        _check(fn(x, w.weight, w.scales, e), x, dequantize(one))

    def f(x_, w_, e_):  # type: ignore[no-untyped-def]
        return quant.qmatmul(x_, quant.take_expert(w_, e_))

    e1 = jnp.asarray(1, jnp.int32)
    with chunked_qmatmul(True):
        text = _program(f, x, w, e1)
        fast = _jit(f)(x, w, e1)
    assert kernels.QMATMUL4_TARGET in text and "dynamic_slice" not in text
    with chunked_qmatmul(False):
        slow = _jit(f)(x, w, e1)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-5, atol=1e-4)


def test_qmatmul_expert_index_reads_that_expert(isa: str) -> None:
    rng = np.random.default_rng(1)
    w = _quantized(rng, 64, 40, 2, e=3)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    fn = jax.jit(kernels.qmatmul)
    for e in range(3):
        got = fn(x, w.weight, w.scales, e)
        _check(got, x, dequantize(QuantizedWeight8bit(w.weight[e], w.scales[e])))


@pytest.mark.parametrize(
    ("m", "d", "v"),
    [(1, 1024, 1000), (6, 40, 13), (2, 7, 5), (70, 72, 300)],  # 70: two row chunks
)
def test_matmul_nt_bf16_matches(isa: str, m: int, d: int, v: int) -> None:
    rng = np.random.default_rng(d)
    table = jnp.asarray(rng.standard_normal((v, d)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.bfloat16)
    got = jax.jit(kernels.matmul_nt_bf16)(x, table)
    _check(got, x, table.T)


@pytest.mark.parametrize(
    ("m", "d", "v"),
    # (5, 128, 300), (17, 1024, 272), (70, 192, 531): bf16 x on AMX tiles (a page_rows group's
    # tiles and contiguous ones, x's second block of 16 rows, a unit's last rows past 16)
    [(1, 1024, 1000), (6, 40, 13), (2, 7, 5), (3, 70, 9), (70, 72, 300), (5, 128, 300)]
    + [(17, 1024, 272), (70, 192, 531)],
)
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16])
def test_matmul_nt_int8_matches(isa: str, m: int, d: int, v: int, xdtype) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(d + 7)
    table = jnp.asarray(rng.integers(-128, 128, (v, d), dtype=np.int8))
    x = jnp.asarray(rng.standard_normal((m, d)), xdtype)
    got = jax.jit(kernels.matmul_nt_int8)(x, table)
    _check(got, x, table.T.astype(jnp.float32))


def _jit(fn):  # type: ignore[no-untyped-def]
    """A fresh jitted function: the cpu-mode flag is read at trace time, and jax caches traces
    per function."""
    return jax.jit(lambda *a: fn(*a))


def _program(fn, *args) -> str:  # type: ignore[no-untyped-def]
    return str(_jit(fn).lower(*args).as_text())


def test_qmatmul_uses_the_kernel_in_cpu_mode_and_agrees_with_the_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(2)
    w = _quantized(rng, 128, 48, 4, e=2)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)
    e = jnp.asarray(1, jnp.int32)

    def f(x_, w_, e_):  # type: ignore[no-untyped-def]
        return quant.qmatmul(x_, quant.take_expert(w_, e_))

    with chunked_qmatmul(True):
        text = _program(f, x, w, e)
        fast = _jit(f)(x, w, e)
    assert kernels.QMATMUL_TARGET in text
    assert "dynamic_slice" not in text  # the expert is read in place, not copied out first
    with chunked_qmatmul(False):
        slow_text = _program(f, x, w, e)
        slow = _jit(f)(x, w, e)
    assert kernels.QMATMUL_TARGET not in slow_text
    monkeypatch.setenv("GROKCTL_CPU_KERNELS", "0")
    assert not kernels.available()
    with chunked_qmatmul(True):
        assert kernels.QMATMUL_TARGET not in _program(f, x, w, e)
    # same rounding points, only the f32 summation order differs
    _check(fast, x, dequantize(QuantizedWeight8bit(w.weight[1], w.scales[1])))
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-5, atol=1e-4)


def test_decode_batches_up_to_kernel_max_m_take_the_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without AMX, a decode step of up to KERNEL_MAX_M rows (batch 64) runs its projections and
    MoE rows on the native kernels; more rows (prefill) take XLA's dot. The logits take the kernel
    at any number of rows."""
    monkeypatch.setenv("GROKCTL_CPU_ISA", "avx512_vnni")  # AMX moves the MoE limits: next test
    rng = np.random.default_rng(5)
    w = _quantized(rng, 64, 48, 4)
    wide = _quantized(rng, 64, 48, 4, e=4)
    table = jnp.asarray(rng.standard_normal((300, 64)), jnp.bfloat16)
    top = quant.KERNEL_MAX_M
    assert top >= 32 and quant.ROWS_KERNEL_MAX >= 2 * top  # a batch of `top` with top-2 routing
    for m, kernel in ((top, True), (top + 1, False)):
        x = jnp.asarray(rng.standard_normal((m, 64)), jnp.bfloat16)
        idx = jnp.zeros((2 * m,), jnp.int32)
        with chunked_qmatmul(True):
            assert (kernels.QMATMUL_TARGET in _program(quant.qmatmul, x, w)) is kernel
            assert kernels.MATMUL_NT_TARGET in _program(quant.unembed, x, table)
            assert quant.rows_kernel_ok(2 * m, wide) is kernel
            if kernel:  # the rows call the MoE layer makes at this batch
                rows = jnp.repeat(x, 2, axis=0)
                assert kernels.QMATMUL_ROWS_TARGET in _program(quant.qmatmul_rows, rows, wide, idx)
    # a prefill's sorted MoE blocks: the kernel up to BLOCK_KERNEL_MAX_M rows (int4:
    # BLOCK_KERNEL_MAX_M4), then XLA's dot
    wide4 = _quantized4(rng, 64, 48, 4, e=4, scales="exact")
    assert quant.BLOCK_KERNEL_MAX_M < quant.BLOCK_KERNEL_MAX_M4 <= top

    def f(x_, w_):  # type: ignore[no-untyped-def]
        return quant.qmatmul(x_, quant.take_expert(w_, jnp.int32(2)))

    for ww, block, target in (
        (wide, quant.BLOCK_KERNEL_MAX_M, kernels.QMATMUL_TARGET),
        (wide4, quant.BLOCK_KERNEL_MAX_M4, kernels.QMATMUL4_TARGET),
    ):
        for m, kernel in ((block, True), (block + 1, False)):
            x = jnp.asarray(rng.standard_normal((m, 64)), jnp.bfloat16)
            with chunked_qmatmul(True):
                assert (target in _program(f, x, ww)) is kernel


def test_prompts_moe_layers_take_the_amx_kernel() -> None:
    """On an AMX CPU, a prompt's int8 MoE layer runs on the kernels: as rows calls up to
    AMX_ROWS_KERNEL_MAX assignments, beyond that as sorted blocks of any size; int4 keeps its
    limits (its kernel has no tiles), and so do the 2-D projections (KERNEL_MAX_M)."""
    if kernels.info().get("isa") != "amx":
        pytest.skip("no AMX here")
    rng = np.random.default_rng(5)
    wide = _quantized(rng, 64, 48, 4, e=4)
    wide4 = _quantized4(rng, 64, 48, 4, e=4, scales="exact")
    top = quant.AMX_ROWS_KERNEL_MAX
    assert top >= 4 * quant.ROWS_KERNEL_MAX
    with chunked_qmatmul(True):
        assert quant.rows_kernel_ok(top, wide) and not quant.rows_kernel_ok(top + 1, wide)
        assert not quant.rows_kernel_ok(quant.ROWS_KERNEL_MAX + 1, wide4)

    def f(x_, w_):  # type: ignore[no-untyped-def]
        return quant.qmatmul(x_, quant.take_expert(w_, jnp.int32(2)))

    x = jnp.asarray(rng.standard_normal((quant.AMX_BLOCK_KERNEL_MAX_M, 64)), jnp.bfloat16)
    x4 = x[: quant.BLOCK_KERNEL_MAX_M4 + 1]
    x2 = x[: quant.KERNEL_MAX_M + 1]
    with chunked_qmatmul(True):
        assert kernels.QMATMUL_TARGET in _program(f, x, wide)
        assert kernels.QMATMUL4_TARGET not in _program(f, x4, wide4)
        assert kernels.QMATMUL_TARGET not in _program(quant.qmatmul, x2, _quantized(rng, 64, 48, 4))


def test_bf16_table_and_unembed_are_exact() -> None:
    rng = np.random.default_rng(3)
    table = jnp.asarray(rng.standard_normal((300, 64)), jnp.float32)
    params = {quant.EMBEDDINGS[0]: {quant.EMBEDDINGS[1]: table}, "other": {"w": table}}
    cast = quant.bf16_tables(params)
    t16 = cast[quant.EMBEDDINGS[0]][quant.EMBEDDINGS[1]]  # bf16 bits
    assert t16.dtype == quant.BF16_BITS and cast["other"]["w"].dtype == jnp.float32
    np.testing.assert_array_equal(quant.from_bits(t16), table.astype(jnp.bfloat16))
    assert quant.bf16_tables(cast)[quant.EMBEDDINGS[0]][quant.EMBEDDINGS[1]] is t16
    h = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)
    with chunked_qmatmul(False):
        ref = _jit(quant.unembed)(h, table)  # the pure-JAX path on the f32 table
    with chunked_qmatmul(True):
        assert kernels.MATMUL_NT_TARGET in _program(quant.unembed, h, t16)
        got = _jit(quant.unembed)(h, t16)
    with chunked_qmatmul(False):  # XLA's path over the bits: the same rounding points
        np.testing.assert_array_equal(_jit(quant.unembed)(h, t16), ref)
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 1, 300)
    # bf16-rounded results: equal, or one bf16 ulp apart where f32 sums straddle a rounding edge
    diff = np.abs(np.asarray(got, np.float32) - np.asarray(ref, np.float32))
    ulp = np.abs(np.asarray(ref, np.float32)) * 2.0**-7
    assert np.all(diff <= ulp + 1e-30)


def test_int8_table_unembed_kernel_matches_xla() -> None:
    """An int8-per-row table (native `--embeddings int8`): the kernel's logits equal XLA's up to
    one bf16 rounding step, and the program calls the kernel."""
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.integers(-127, 128, (300, 64), dtype=np.int8))
    s = jnp.asarray(rng.uniform(0.001, 0.02, (300, 1)), jnp.bfloat16)
    table = quant.QuantizedWeight(w, s)
    h = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)
    with chunked_qmatmul(False):
        ref = _jit(quant.unembed)(h, table)
    with chunked_qmatmul(True):
        assert kernels.MATMUL_NT_INT8_TARGET in _program(quant.unembed, h, table)
        got = _jit(quant.unembed)(h, table)
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 1, 300)
    diff = np.abs(np.asarray(got, np.float32) - np.asarray(ref, np.float32))
    ulp = np.abs(np.asarray(ref, np.float32)) * 2.0**-7
    assert np.all(diff <= ulp + 1e-30)
    assert np.mean(diff == 0) >= 0.9


def test_build_failure_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kernels, "BUILD_DIR", tmp_path / "pkg")
    monkeypatch.setattr(kernels, "user_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert kernels._find_or_build() is None
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.slow
def test_engine_with_kernels_on_a_config_file_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`random-checkpoint --config FILE` (odd widths: N not a multiple of the vector width),
    then the same decode with and without the kernels: same logits up to summation order."""
    import json

    from typer.testing import CliRunner

    import grokctl
    from grokctl.cli.app import app
    from grokctl.model.sharding import make_mesh

    cfg = {
        "emb_size": 72,
        "key_size": 12,
        "num_q_heads": 6,
        "num_kv_heads": 2,
        "num_layers": 2,
        "vocab_size": 300,
        "widening_factor": 2.5,
        "num_experts": 4,
        "num_selected_experts": 2,
        "sequence_len": 64,
        "row_parallel_scale_blocks": 3,
    }
    (tmp_path / "arch.json").write_text(json.dumps(cfg))
    ckpt = tmp_path / "ckpt"
    res = CliRunner().invoke(
        app, ["random-checkpoint", str(ckpt), "--config", str(tmp_path / "arch.json"), "--json"]
    )
    assert res.exit_code == 0, res.output
    written = json.loads((ckpt / "config.json").read_text())
    assert all(written[k] == v for k, v in cfg.items())

    prompt = np.array([[5, 17, 33, 101, 250, 7]], np.int32)

    def run() -> tuple[str, np.ndarray]:
        model = grokctl.load_model(ckpt, mesh=make_mesh("1x1", jax.devices()[:1]))
        eng = model.engine
        cache = eng.new_cache(1, 16)
        logits, cache = eng.prefill(prompt, np.array([6], np.int32), cache)
        rows = [np.asarray(logits)]
        for tok in (9, 42, 77):
            logits, cache = eng.decode(np.array([tok], np.int32), cache)
            rows.append(np.asarray(logits))
        table = eng.params[quant.EMBEDDINGS[0]][quant.EMBEDDINGS[1]]
        return str(table.dtype), np.stack(rows)

    dtype_on, on = run()
    monkeypatch.setenv("GROKCTL_CPU_KERNELS", "0")
    dtype_off, off = run()
    assert (dtype_on, dtype_off) == ("uint16", "float32")  # bf16 bits with the kernels
    scale = float(np.max(np.abs(off)))
    assert np.max(np.abs(on - off)) <= 2e-2 * scale, (np.max(np.abs(on - off)), scale)
    assert np.mean(np.argmax(on, -1) == np.argmax(off, -1)) >= 0.75


def test_random_checkpoint_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grokctl.cli.app import main

    missing = tmp_path / "no.json"
    assert main(["random-checkpoint", str(tmp_path / "a"), "--config", str(missing)]) == 4
    assert "no.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert (
        main(["random-checkpoint", str(tmp_path / "b"), "--config", str(tmp_path / "bad.json")])
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bits", [8, 4, "4-exact"])
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    ("k", "n", "g", "experts"),
    [
        (64, 40, 2, [2, 0, 2, 1]),
        (600, 2100, 3, [1, 1]),
        (96, 37, 4, [3]),
        (96, 37, 4, [3, 0] * 5 + [3, 3, 1]),  # 8 rows on one expert: two 4-row blocks
    ],
)
def test_qmatmul_rows_each_row_its_expert(
    isa: str, bits: int | str, xdtype, k: int, n: int, g: int, experts: list[int]
) -> None:  # type: ignore[no-untyped-def]
    """Every row times its own expert's matrix, bit-identical to the single-expert kernel (the
    same per-row sums), rows sharing an expert included; ids past the last expert clamp (a
    negative one skips its row: test_qmatmul_rows_skips_negative_ids)."""
    rng = np.random.default_rng(k + n)
    if bits == 8:
        w = _quantized(rng, k, n, g, e=4)
    else:
        w = _quantized4(rng, k, n, g, e=4, scales="mixed" if bits == "4-exact" else "bf16")
        bits = 4
    x = jnp.asarray(rng.standard_normal((len(experts), k)), xdtype)
    idx = jnp.asarray(experts, jnp.int32)
    got = np.asarray(jax.jit(kernels.qmatmul_rows)(x, w.weight, w.scales, idx))
    single = jax.jit(kernels.qmatmul4 if bits == 4 else kernels.qmatmul)
    for a, e in enumerate(experts):
        one = np.asarray(single(x[a : a + 1], w.weight, w.scales, e))[0]
        np.testing.assert_array_equal(got[a], one)
        ref = quant.QuantizedWeight(w.weight[e], w.scales[e], bits=bits)
        _check(jnp.asarray(got[a : a + 1]), x[a : a + 1], dequantize(ref))
    clamped = np.asarray(
        jax.jit(kernels.qmatmul_rows)(x[:1], w.weight, w.scales, jnp.asarray([9], jnp.int32))
    )
    np.testing.assert_array_equal(clamped[0], np.asarray(single(x[:1], w.weight, w.scales, 3))[0])


def test_qmatmul_rows_skips_negative_ids(isa: str) -> None:
    """A row whose id is negative (a prompt's padding) gets zeros and the others exactly what
    they get without it, through the AMX tiles (12 rows of one expert) and the FMA kernel."""
    rng = np.random.default_rng(9)
    w = _quantized(rng, 256, 96, 2, e=4)
    x = jnp.asarray(rng.standard_normal((20, 256)), jnp.bfloat16)
    ids = np.array([2] * 12 + [0, 3, 3, 1, 2, 0, 1, 3], np.int32)
    skip = np.zeros(20, bool)
    skip[[3, 12, 19]] = True
    rows = jax.jit(kernels.qmatmul_rows)
    got = np.asarray(rows(x, w.weight, w.scales, jnp.asarray(np.where(skip, -1, ids))))
    assert (got[skip] == 0).all()
    live = np.flatnonzero(~skip)
    want = np.asarray(rows(x[live], w.weight, w.scales, jnp.asarray(ids[live])))
    np.testing.assert_array_equal(got[live], want)
    assert np.abs(want).mean() > 0.1


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (8, 4)])
def test_qmatmul_rows2_is_two_rows_calls_in_one(isa: str, bits: tuple[int, int]) -> None:
    """Two weights of the same experts (different widths, int8 and/or int4) in one call give
    exactly what two `qmatmul_rows` calls give; a shape mismatch between them is an error."""
    rng = np.random.default_rng(5)
    make = {8: _quantized, 4: _quantized4}
    w = make[bits[0]](rng, 256, 320, 2, e=4)
    v = make[bits[1]](rng, 256, 96, 4, e=4)
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
    idx = jnp.asarray([3, 1, 3, 0, 1], jnp.int32)
    yw, yv = jax.jit(kernels.qmatmul_rows2)(x, (w.weight, w.scales), (v.weight, v.scales), idx)
    rows = jax.jit(kernels.qmatmul_rows)
    np.testing.assert_array_equal(np.asarray(yw), np.asarray(rows(x, w.weight, w.scales, idx)))
    np.testing.assert_array_equal(np.asarray(yv), np.asarray(rows(x, v.weight, v.scales, idx)))
    other = _quantized(rng, 256, 96, 4, e=3)  # 3 experts, not 4
    with pytest.raises(Exception, match="grokctl_qmatmul_rows2: shape mismatch"):
        jax.block_until_ready(
            jax.jit(kernels.qmatmul_rows2)(
                x, (w.weight, w.scales), (other.weight, other.scales), idx
            )
        )


def test_native_argmax_matches_jnp_and_sample(isa: str) -> None:
    from grokctl.sampling import first_argmax, sample

    rng = np.random.default_rng(6)
    x = rng.integers(-3, 4, (6, 300)).astype(np.float32)  # ties
    x[1, 40], x[1, 9] = np.nan, np.nan  # the first NaN wins
    x[2, 197] = np.nan  # a NaN in the last, partial vector below the limit
    x[3, :] = -np.inf
    x[4, 250] = 99.0  # beyond the limit below: never picked
    x[5, :] = 0.0
    x[5, :7] = -0.0  # equal zeros: the first
    got = np.asarray(jax.jit(kernels.argmax, static_argnums=1)(jnp.asarray(x), 200))
    masked = np.where(np.arange(300) < 200, x, -np.inf)
    np.testing.assert_array_equal(got, np.asarray(first_argmax(jnp.asarray(masked))))
    assert got[1] == 9 and got[2] == 197 and got[3] == 0 and got[4] != 250 and got[5] == 0
    # sample(): greedy rows through the kernel, sampled rows unchanged
    temp = jnp.asarray([0.0, 0.0, 0.8, 0.0, 1.0], jnp.float32)
    args = (
        jnp.asarray(rng.standard_normal((5, 300)), jnp.float32),
        jnp.arange(5, dtype=jnp.int32),
        jnp.int32(2),
        temp,
        jnp.full(5, 0.9, jnp.float32),
        jnp.zeros(5, jnp.int32),
    )
    fn = jax.jit(sample, static_argnames=("vocab_limit", "native_argmax"))
    a = np.asarray(fn(*args, vocab_limit=250, native_argmax=True))
    b = np.asarray(fn(*args, vocab_limit=250, native_argmax=False))
    np.testing.assert_array_equal(a, b)
    text = fn.lower(*args, vocab_limit=250, native_argmax=True).as_text()
    assert kernels.ARGMAX_TARGET in text


@pytest.mark.parametrize("mix", ["int8", "int4", "mixed", "odd-groups"])
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16])
def test_qmatmul3_three_products_in_one_call(isa: str, mix: str, xdtype) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(len(mix))
    k = 96
    if mix == "int8":
        ws = [_quantized(rng, k, n, 4) for n in (64, 32, 32)]
    elif mix == "int4":
        ws = [
            _quantized4(rng, k, n, 3, scales=s)
            for n, s in ((64, "exact"), (20, "mixed"), (20, "bf16"))
        ]
    elif mix == "mixed":
        ws = [_quantized(rng, k, 50, 2), _quantized4(rng, k, 33, 6), _quantized(rng, k, 16, 1)]
    else:  # the first: 96 rows in 32 groups, 3 rows each (odd): no whole 8-row pass, single rows
        ws = [_quantized(rng, k, 40, 32), _quantized4(rng, k, 24, 4), _quantized(rng, k, 8, 2)]
    x = jnp.asarray(rng.standard_normal((3, k)), xdtype)
    got = jax.jit(kernels.qmatmul3)(x, *((w.weight, w.scales) for w in ws))
    for y, w in zip(got, ws, strict=True):
        _check(y, x, dequantize(w))
    with chunked_qmatmul(True):
        text = _program(lambda a, b, c, d: quant.qmatmul_many(a, [b, c, d]), x, *ws)
    assert kernels.QMATMUL3_TARGET in text


def _attend_reference(q, kc, vc, positions, valid, mult, cap):  # type: ignore[no-untyped-def]
    """The reference's attention in float64 numpy with its bf16 rounding points."""
    import ml_dtypes

    def rnd(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)

    b, t, h, k = q.shape
    g, s = kc.shape[1], kc.shape[2]
    qf = np.asarray(q.astype(jnp.float32), np.float64).reshape(b, t, g, h // g, k)
    kf = np.asarray(jax.lax.bitcast_convert_type(kc, jnp.bfloat16).astype(jnp.float32), np.float64)
    vf = np.asarray(jax.lax.bitcast_convert_type(vc, jnp.bfloat16).astype(jnp.float32), np.float64)
    logits = rnd(np.einsum("btgrk,bgsk->bgrts", qf, kf)) * np.float32(mult)
    logits = cap * np.tanh(logits / cap)
    mask = (np.arange(s)[None, None, :] <= np.asarray(positions)[:, :, None]) & np.asarray(valid)[
        :, None, :
    ]
    logits = np.where(mask[:, None, None], logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = rnd(w / w.sum(-1, keepdims=True))
    return np.einsum("bgrts,bgsk->btgrk", w, vf).reshape(b, t, h, k)


@pytest.mark.parametrize(
    ("b", "t", "h", "g", "s", "k", "qdtype"),
    [
        (2, 1, 6, 2, 37, 128, jnp.bfloat16),  # decode, R = 3
        (1, 3, 8, 8, 100, 24, jnp.float32),  # a few new tokens (speculative steps), R = 1
        (3, 2, 4, 1, 9, 16, jnp.bfloat16),  # one kv head; row 2 has no visible key
        (1, 8, 4, 2, 300, 12, jnp.bfloat16),  # 8 new tokens at the end of the cache
        (2, 1, 48, 8, 1000, 128, jnp.bfloat16),  # Grok-1's heads
    ],
)
def test_attend_kernel_matches_reference(isa: str, b, t, h, g, s, k, qdtype) -> None:  # type: ignore[no-untyped-def]
    """The native attention against float64 math with the same rounding points, and against
    the XLA form; pad keys, causal masks and a fully masked row (uniform weights)."""
    from grokctl.model.attention import attend_xla
    from grokctl.model.quant import to_bits

    rng = np.random.default_rng(s + t)
    q = jnp.asarray(rng.standard_normal((b, t, h, k)) * 2, qdtype)
    kc = to_bits(jnp.asarray(rng.standard_normal((b, g, s, k)) * 2, jnp.float32))
    vc = to_bits(jnp.asarray(rng.standard_normal((b, g, s, k)), jnp.float32))
    start = rng.integers(0, s - t + 1, b)
    start[0] = s - t  # the last rows of the cache
    positions = jnp.asarray(start[:, None] + np.arange(t)[None], jnp.int32)
    valid = rng.random((b, s)) > 0.2
    valid[:, 0] = False  # a left pad
    if b == 3:
        valid[2] = False
    valid = jnp.asarray(valid)
    mult, cap = 0.0883883, 30.0
    got = np.asarray(
        jax.jit(kernels.attend, static_argnums=(5, 6))(q, kc, vc, positions, valid, mult, cap)
    )
    ref = _attend_reference(q, kc, vc, positions, valid, mult, cap)
    xla = np.asarray(
        jax.jit(attend_xla, static_argnums=(5, 6))(q, kc, vc, positions, valid, mult, cap)
    )
    assert got.dtype == np.float32 and got.shape == (b, t, h, k)
    # f32 sums in another order than float64 (a rare bf16 rounding flip of a logit or weight)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got, xla, rtol=0, atol=2e-4)
    if b == 3:  # no visible key: the mean of all S values, as the reference's uniform softmax
        uniform = np.asarray(jax.lax.bitcast_convert_type(vc, jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_allclose(
            got[2, :, 0], np.broadcast_to(uniform[2, 0].mean(0), (t, k)), atol=1e-2
        )


def test_decode_attention_uses_the_kernel_in_place() -> None:
    """A decode step's attention calls the native kernel on one CPU device (cpu mode) and
    converts no cache to f32; prefill-sized T and other meshes keep the XLA form."""
    from grokctl.model.attention import KERNEL_MAX_TOKENS, attend
    from grokctl.model.cache import CACHE_DTYPE

    class Cfg:
        attn_output_multiplier, attn_logit_softcap = 0.1, 30.0

    def f(q, kc, vc, pos, valid):  # type: ignore[no-untyped-def]
        return attend(q, kc, vc, pos, valid, Cfg())  # type: ignore[arg-type]

    def args(t: int) -> tuple[jax.Array, ...]:
        return (
            jnp.zeros((1, t, 4, 16), jnp.bfloat16),
            jnp.zeros((1, 2, 64, 16), CACHE_DTYPE),
            jnp.zeros((1, 2, 64, 16), CACHE_DTYPE),
            jnp.zeros((1, t), jnp.int32),
            jnp.ones((1, 64), bool),
        )

    with chunked_qmatmul(True):
        one = _jit(f).lower(*args(1)).compile().as_text()
        many = _program(f, *args(KERNEL_MAX_TOKENS + 1))
    with chunked_qmatmul(False):
        meshed = _program(f, *args(1))
    assert kernels.ATTEND_TARGET in one
    assert "f32[1,2,64,16]" not in one  # the cache is read in place, never widened
    assert kernels.ATTEND_TARGET not in many and kernels.ATTEND_TARGET not in meshed


@pytest.mark.parametrize("threads", ["1", "3", "7"])
def test_results_do_not_depend_on_the_thread_count(
    threads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker runs its own range of units and steals from the back of the others'; partial
    sums are still added in slab order, so any thread count gives the same bits (more workers
    than units or than the pool's threads included)."""
    rng = np.random.default_rng(11)
    w = _quantized(rng, 1280, 640, 10, e=4)
    x = jnp.asarray(rng.standard_normal((3, 1280)), jnp.float32)
    experts = jnp.asarray([2, 0, 2], jnp.int32)
    table = jnp.asarray(rng.integers(-127, 128, (3000, 256), dtype=np.int8))
    xt = jnp.asarray(rng.standard_normal((2, 256)), jnp.bfloat16)

    def run() -> list[np.ndarray]:
        rows = jax.jit(kernels.qmatmul_rows)(x, w.weight, w.scales, experts)
        logits = jax.jit(kernels.matmul_nt_int8)(xt, table)
        return [np.asarray(rows), np.asarray(logits)]

    monkeypatch.setenv("GROKCTL_CPU_THREADS", "2")
    base = run()
    monkeypatch.setenv("GROKCTL_CPU_THREADS", threads)
    for a, b in zip(base, run(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_concurrent_calls_on_two_devices_agree() -> None:
    """The kernels' own helper threads serve one call at a time; a call that overlaps it (XLA
    runs each device's program on its own thread) runs on XLA's pool instead. Both paths, mixed
    under contention, give the bits of a lone call."""
    rng = np.random.default_rng(12)
    w = _quantized(rng, 1024, 1536, 8, e=2)
    x = jnp.asarray(rng.standard_normal((2, 1024)), jnp.float32)
    experts = jnp.asarray([1, 0], jnp.int32)
    call = jax.jit(kernels.qmatmul_rows)
    args = [jax.device_put((x, w.weight, w.scales, experts), d) for d in jax.devices()[:2]]
    want = np.asarray(call(*args[0]))
    results: list[list[np.ndarray]] = [[], []]

    def worker(i: int) -> None:
        for _ in range(40):
            results[i].append(np.asarray(call(*args[i])))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results[0]) == len(results[1]) == 40
    for got in results[0] + results[1]:
        np.testing.assert_array_equal(got, want)


def test_batch_one_int8_logits_take_the_chosen_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """GROKCTL_CPU_LOGITS picks batch 1's int8-table logits on a VNNI CPU: "f32" gives the f32
    path's bits (those of the AVX-512 BF16 cap), "vnni" the correctly rounded ones; unset, the
    CPU's default (f32 on AMD Zen 5 only); info() says which."""
    monkeypatch.delenv("GROKCTL_CPU_ISA", raising=False)
    if kernels.info()["isa"] not in ("avx512_vnni", "amx"):
        pytest.skip("no VNNI: batch 1's int8 logits are f32 here")
    rng = np.random.default_rng(5)
    table = jnp.asarray(rng.integers(-128, 128, (700, 300), dtype=np.int8))
    x = jnp.asarray(rng.standard_normal((1, 300)), jnp.bfloat16)
    nt = jax.jit(kernels.matmul_nt_int8)
    got = {}
    for choice in ("f32", "vnni"):
        monkeypatch.setenv("GROKCTL_CPU_LOGITS", choice)
        assert kernels.info()["int8_logits"] == choice
        got[choice] = np.asarray(nt(x, table))
    exact = (np.asarray(x, np.float64) @ np.asarray(table, np.float64).T).astype(np.float32)
    np.testing.assert_array_equal(got["vnni"], exact)
    monkeypatch.setenv("GROKCTL_CPU_ISA", "avx512_bf16")
    np.testing.assert_array_equal(got["f32"], np.asarray(nt(x, table)))
    assert not np.array_equal(got["f32"], exact)  # f32 sums, rounded at every addition
    monkeypatch.delenv("GROKCTL_CPU_ISA")
    monkeypatch.delenv("GROKCTL_CPU_LOGITS")
    default = kernels.info()["int8_logits"]
    np.testing.assert_array_equal(np.asarray(nt(x, table)), got[default])


@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16])
def test_amx_takes_several_rows_and_keeps_non_finite_values(
    monkeypatch: pytest.MonkeyPatch, xdtype
) -> None:  # type: ignore[no-untyped-def]
    """On an AMX CPU, 16 rows of x go through the tiles (f32 x as three exact bf16 planes): f32
    sums in another order than the AVX-512 kernel's, within the same bound; an inf or NaN in x
    gives what the AVX-512 kernel gives (inf, -inf or NaN in the same places); and a MoE step's
    rows on one expert take the same path as one call on that expert."""
    monkeypatch.delenv("GROKCTL_CPU_ISA", raising=False)
    if kernels.info()["isa"] != "amx":
        pytest.skip("no AMX here")
    rng = np.random.default_rng(8)
    w = _quantized(rng, 640, 200, 2, e=3)
    x = np.asarray(rng.standard_normal((16, 640)), np.float32)
    x[3, 7], x[5, 100], x[9, 639] = np.inf, -np.inf, np.nan
    xj = jnp.asarray(x, xdtype)
    mm = jax.jit(kernels.qmatmul)
    amx = np.asarray(mm(xj, w.weight, w.scales, 1))
    monkeypatch.setenv("GROKCTL_CPU_ISA", "avx512_vnni")
    fma = np.asarray(mm(xj, w.weight, w.scales, 1))
    monkeypatch.delenv("GROKCTL_CPU_ISA")
    finite = [r for r in range(16) if r not in (3, 5, 9)]
    np.testing.assert_array_equal(np.isnan(amx), np.isnan(fma))
    np.testing.assert_array_equal(amx[~np.isfinite(fma)], fma[~np.isfinite(fma)])
    assert not np.array_equal(amx[finite], fma[finite])  # another path, not the same one
    _check(jnp.asarray(amx[finite]), xj[jnp.asarray(finite)], dequantize(_slice(w, 1)))
    rows = jax.jit(kernels.qmatmul_rows)(xj, w.weight, w.scales, jnp.full((16,), 1, jnp.int32))
    np.testing.assert_array_equal(np.asarray(rows), amx)


def _exact_logits_case(
    seed: int, m: int, d: int, v: int
) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """An int8 table [v, d], m rows of bf16 x — row 1 tiny but for one entry (below the four digit
    planes of its largest: remainder terms), row 2 zero — and their float64 product."""
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.integers(-128, 128, (v, d), dtype=np.int8))
    x = rng.standard_normal((m, d)).astype(np.float32)
    x[1] *= 2.0**-22
    x[1, 0] = 1.0
    x[2, :] = 0.0
    xb = jnp.asarray(x, jnp.bfloat16)
    return table, xb, np.asarray(xb, np.float64) @ np.asarray(table, np.float64).T


def _assert_correctly_rounded(got: np.ndarray, exact: np.ndarray) -> None:
    """Each row the float64 product rounded once to f32; row 1's remainders within an ulp."""
    others = np.arange(len(got)) != 1
    np.testing.assert_array_equal(got[others], exact[others].astype(np.float32))
    assert np.all(np.abs(got[1] - exact[1]) <= np.spacing(np.abs(exact[1]).astype(np.float32)))


def test_int8_table_logits_on_amx_are_those_of_one_row_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On an AMX CPU, several rows of bf16 x over an int8 table (a batched decode step's logits)
    go through the int8 tiles in the VNNI path's exact arithmetic: each row's logits are, bit for
    bit, those of that row alone (batch 1's VNNI path) and the float64 product rounded once to
    f32 (remainders of tiny activations within an ulp); a non-finite activation falls back to the
    bf16 path (NaN in its row)."""
    monkeypatch.delenv("GROKCTL_CPU_ISA", raising=False)
    monkeypatch.setenv("GROKCTL_CPU_LOGITS", "vnni")
    if kernels.info()["isa"] != "amx":
        pytest.skip("no AMX here")
    table, xb, exact = _exact_logits_case(22, 19, 1024, 600)
    nt = jax.jit(kernels.matmul_nt_int8)
    got = np.asarray(nt(xb, table))
    one = np.concatenate([np.asarray(nt(xb[i : i + 1], table)) for i in range(19)])
    np.testing.assert_array_equal(got, one)
    _assert_correctly_rounded(got, exact)
    monkeypatch.setenv("GROKCTL_CPU_ISA", "avx512_vnni")
    assert not np.array_equal(np.asarray(nt(xb, table)), got)  # the bf16 path: f32 sums
    monkeypatch.delenv("GROKCTL_CPU_ISA")
    bad = np.asarray(nt(xb.at[4, 9].set(jnp.nan), table))
    assert np.isnan(bad[4]).all() and np.isfinite(np.delete(bad, 4, 0)).all()


def _slice(w: QuantizedWeight8bit, e: int) -> QuantizedWeight8bit:
    return QuantizedWeight8bit(w.weight[e], w.scales[e])


def test_int8_table_logits_on_vnni_are_correctly_rounded(isa: str) -> None:
    """The VNNI path (one row of bf16 x, int8 table: batch 1 decode) computes the dot products
    exactly in integers: each logit is the float64 product rounded once to f32, remainders of
    tiny activations included; a non-finite activation falls back to the f32 path (NaN, as XLA
    gives), and so does the batched (bf16) path."""
    if isa not in ("avx512_vnni", "amx"):
        pytest.skip("the VNNI path only")
    table, xb, exact = _exact_logits_case(21, 3, 1100, 520)
    nt = jax.jit(kernels.matmul_nt_int8)
    got = np.concatenate([np.asarray(nt(xb[i : i + 1], table)) for i in range(3)])
    _assert_correctly_rounded(got, exact)
    assert np.mean(got[1] == exact[1].astype(np.float32)) > 0.99
    bad = xb.at[0, 5].set(jnp.inf).at[1, 9].set(jnp.nan)
    assert np.isnan(np.asarray(nt(bad, table))[1]).all()
    assert np.isnan(np.asarray(nt(bad[1:2], table))).all()
