"""`grokctl bench`: how fast a checkpoint runs here, and how far that is from what the hardware
allows (llama-bench's cases and output contract; see docs/bench.md).

    run = run_bench("ckpt/", BenchSpec(prompts=(512,), gens=(128,), batches=(1, 8)))
    print(render(run.records, "md"))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grokctl import costmodel, hw, kernels, routing
from grokctl.bench.cases import (
    BenchSpec,
    Case,
    CaseResult,
    Runner,
    parse_list,
    parse_moe,
    plan_cases,
)
from grokctl.bench.report import (
    FORMATS,
    SCHEMA,
    Regression,
    check_same_model,
    check_writable,
    compare,
    compare_text,
    load_records,
    model_summary,
    now,
    plot,
    record,
    render,
    write_atomic,
)
from grokctl.model.quant import cpu_kernels_enabled

OnCase = Callable[[int, int, Case, int, int], None]  # (case no., of, case, rep done, of reps)


@dataclasses.dataclass
class BenchRun:
    records: list[dict[str, Any]]
    env: dict[str, Any]
    cases: list[Case]
    # --routing-report: per MoE kernel, the summed statistics and the files written
    routing_stats: dict[str, routing.RoutingStats] = dataclasses.field(default_factory=dict)
    routing_files: dict[str, dict[str, Path]] = dataclasses.field(default_factory=dict)


def routing_dirs(out_dir: str | os.PathLike[str], moes: tuple[str, ...]) -> dict[str, Path]:
    """Where each MoE kernel's routing report goes, checked writable now (exit 4 if not):
    DIR itself for one kernel (generate's layout), DIR/sparse and DIR/dense for both."""
    base = routing.check_report_dir(out_dir)
    if len(moes) == 1:
        return {moes[0]: base}
    return {moe: routing.check_report_dir(base / moe) for moe in moes}


def prepare(
    checkpoint: str | os.PathLike[str],
    spec: BenchSpec,
    mesh: Any = None,
    preset: str | None = None,
) -> tuple[Any, list[Case], dict[str, Any]]:
    """Index the checkpoint (headers only) and check every case before any weight is loaded:
    (index, cases, model summary). `mesh`: "DxM", a jax Mesh, or None (all devices on 'model')."""
    from grokctl.checkpoint.index import CheckpointIndex
    from grokctl.model.sharding import DATA, mesh_shape, parse_mesh_shape

    index = CheckpointIndex.open(checkpoint, preset=preset)
    if mesh is None or isinstance(mesh, str):
        data = parse_mesh_shape(mesh)[0] if mesh else 1
    else:
        data = mesh_shape(mesh)[DATA]
    cases = plan_cases(spec, index.config, data)
    precision = costmodel.index_precision(index)
    stored = sum(int(e.ref.nbytes) for e in index)
    model = model_summary(index.config, precision, Path(index.root).name, stored)
    return index, cases, model


def run_bench(
    checkpoint: str | os.PathLike[str],
    spec: BenchSpec,
    mesh: Any = None,
    preset: str | None = None,
    layout: str = "tensor",
    seed: int = 0,
    on_case: OnCase | None = None,
    on_load: Callable[[int, int], None] | None = None,
    routing_report: str | os.PathLike[str] | None = None,
) -> BenchRun:
    """Load once, probe the machine's memory bandwidth and matmul peak, time every case.
    `routing_report`: also the routing statistics of every timed repetition's tokens (an
    untimed replay after each case's repetitions), one report per MoE kernel (`routing_dirs`)."""
    import grokctl

    index, cases, model_info = prepare(checkpoint, spec, mesh, preset)
    dirs = routing_dirs(routing_report, spec.moes) if routing_report is not None else {}
    model = grokctl.load_model(
        str(checkpoint),
        mesh=mesh,
        moe=spec.moes[0],
        layout=layout,
        preset=preset,
        on_progress=on_load,
    )
    engine = model.engine
    bw = hw.copy_bandwidth(engine.mesh)  # probed again after the cases (below)
    env: dict[str, Any] = {
        "timestamp": now(),
        "commit": hw.commit(),
        "versions": hw.package_versions(),
        **hw.devices(engine.mesh),
        "hardware": hw.hardware(),
        "kernels": kernels.info() if cpu_kernels_enabled(engine.chunked_qmatmul) else None,
        "model": model_info,
        "precision": costmodel.index_precision(index).to_json(),
        "checkpoint": str(index.root),
        "load_s": round(model.load_stats.seconds, 3),
        "load_gb_s": round(model.load_stats.gb_per_s, 3),
        "mem_bw_method": bw["method"],
        "matmul_peak_flop_s": hw.matmul_peak(engine.mesh),
        "decode_steps": spec.decode_steps,
    }
    tensors = costmodel.roofline_tensor_bytes(index)
    runner = Runner(engine, seed, routing=bool(dirs), decode_steps=spec.decode_steps)
    results = []
    sums: dict[str, routing.RoutingStats] = {}
    for i, case in enumerate(cases):

        def on_rep(c: Case, done: int, of: int, i: int = i) -> None:
            if on_case:
                on_case(i + 1, len(cases), c, done, of)

        on_rep(case, 0, spec.reps)
        result = runner.run(case, spec.reps, on_rep)
        if result.routing is not None:
            prev = sums.get(case.moe)
            sums[case.moe] = result.routing if prev is None else prev + result.routing
        results.append(result)
    # The roofline is the best of two probes, one before and one after the cases: on a shared
    # host the bandwidth drifts, and one probe in a slow moment would overstate the cases' share.
    probes = [bw["gb_s"], hw.copy_bandwidth(engine.mesh)["gb_s"]]
    env["mem_bw_gb_s"], env["mem_bw_probes_gb_s"] = max(probes), probes
    records = [
        record(
            r, env, model.config, tensors, dirs[r.case.moe] / routing.JSON_NAME if dirs else None
        )
        for r in results
    ]
    files = {}
    for moe, stats in sums.items():
        meta = {
            "command": "bench",
            "checkpoint": str(index.root),
            "moe": moe,
            "cases": [f"{c.label} b{c.batch}" for c in cases if c.moe == moe],
            "reps": spec.reps,
            "seed": seed,
            "counted": "every token of every timed repetition, replayed untimed",
        }
        files[moe] = routing.write_report(dirs[moe], stats, meta)
    return BenchRun(records, env, cases, sums, files)


__all__ = [
    "FORMATS",
    "SCHEMA",
    "BenchRun",
    "BenchSpec",
    "Case",
    "CaseResult",
    "Regression",
    "Runner",
    "check_same_model",
    "check_writable",
    "compare",
    "compare_text",
    "load_records",
    "parse_list",
    "parse_moe",
    "plot",
    "prepare",
    "render",
    "routing_dirs",
    "run_bench",
    "write_atomic",
]
