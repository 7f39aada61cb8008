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

from grokctl import costmodel, hw
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

OnCase = Callable[[int, int, Case, int, int], None]  # (case no., of, case, rep done, of reps)


@dataclasses.dataclass
class BenchRun:
    records: list[dict[str, Any]]
    env: dict[str, Any]
    cases: list[Case]


def prepare(
    checkpoint: str | os.PathLike[str],
    spec: BenchSpec,
    mesh: str | None = None,
    preset: str | None = None,
) -> tuple[Any, list[Case], dict[str, Any]]:
    """Index the checkpoint (headers only) and check every case before any weight is loaded:
    (index, cases, model summary)."""
    from grokctl.checkpoint.index import CheckpointIndex
    from grokctl.model.sharding import parse_mesh_shape

    index = CheckpointIndex.open(checkpoint, preset=preset)
    data = parse_mesh_shape(mesh)[0] if mesh else 1
    cases = plan_cases(spec, index.config, data)
    precision = costmodel.index_precision(index)
    stored = sum(int(e.ref.nbytes) for e in index)
    model = model_summary(index.config, precision, Path(index.root).name, stored)
    return index, cases, model


def run_bench(
    checkpoint: str | os.PathLike[str],
    spec: BenchSpec,
    mesh: str | None = None,
    preset: str | None = None,
    layout: str = "tensor",
    seed: int = 0,
    on_case: OnCase | None = None,
    on_load: Callable[[int, int], None] | None = None,
) -> BenchRun:
    """Load once, probe the machine's memory bandwidth and matmul peak, time every case."""
    import grokctl

    index, cases, model_info = prepare(checkpoint, spec, mesh, preset)
    model = grokctl.load_model(
        str(checkpoint),
        mesh=mesh,
        moe=spec.moes[0],
        layout=layout,
        preset=preset,
        on_progress=on_load,
    )
    engine = model.engine
    bw = hw.copy_bandwidth(engine.mesh)
    env: dict[str, Any] = {
        "timestamp": now(),
        "commit": hw.commit(),
        "versions": hw.package_versions(),
        **hw.devices(engine.mesh),
        "hardware": hw.hardware(),
        "model": model_info,
        "precision": costmodel.index_precision(index).to_json(),
        "checkpoint": str(index.root),
        "load_s": round(model.load_stats.seconds, 3),
        "load_gb_s": round(model.load_stats.gb_per_s, 3),
        "mem_bw_gb_s": bw["gb_s"],
        "mem_bw_method": bw["method"],
        "matmul_peak_flop_s": hw.matmul_peak(engine.mesh),
    }
    tensors = costmodel.roofline_tensor_bytes(index)
    runner = Runner(engine, seed)
    records = []
    for i, case in enumerate(cases):

        def on_rep(c: Case, done: int, of: int, i: int = i) -> None:
            if on_case:
                on_case(i + 1, len(cases), c, done, of)

        on_rep(case, 0, spec.reps)
        result = runner.run(case, spec.reps, on_rep)
        records.append(record(result, env, model.config, tensors))
    return BenchRun(records, env, cases)


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
    "run_bench",
    "write_atomic",
]
