"""`grokctl quantize SRC DST`: a released or native checkpoint -> native int8/int4, with a report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from grokctl.cli import options
from grokctl.cli.output import emit_json, emit_table, err, info, out, progress
from grokctl.errors import UsageError
from grokctl.units import human_bytes


def quantize(
    src: Annotated[
        Path,
        typer.Argument(help="Source checkpoint: released (ckpt-0/) or native.", show_default=False),
    ],
    dst: Annotated[
        Path, typer.Argument(help="Destination directory (native format).", show_default=False)
    ],
    bits: Annotated[int, typer.Option("--bits", help="Weight bits: 8 (lossless repack) or 4.")] = 4,
    group_size: Annotated[
        int,
        typer.Option(
            "--group-size",
            help="int4: rows per scale group along the contracting axis (the largest divisor "
            "of K below it where it does not divide K).",
        ),
    ] = 128,
    embeddings: Annotated[
        str,
        typer.Option(
            "--embeddings", help="Tied embedding table: f32, bf16 (exact) or int8 per row."
        ),
    ] = "f32",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; read no tensor data, write nothing.")
    ] = False,
    evaluate_only: Annotated[
        bool, typer.Option("--evaluate-only", help="Score an existing DST against SRC.")
    ] = False,
    no_eval: Annotated[
        bool,
        typer.Option(
            "--no-eval",
            help="Skip the end-to-end evaluation (per-tensor errors are still measured).",
        ),
    ] = False,
    mesh: options.Mesh = None,
    force: options.Force = False,
    json_out: options.Json = False,
) -> None:
    """Quantize SRC into a native checkpoint DST and report what it cost: per tensor errors and,
    on seeded probe prompts, top-1 agreement, KL divergence, max |delta logit| and greedy
    continuation agreement against SRC (same engine). Also written to DST/quantization-report.json."""
    from grokctl import quantize as lib
    from grokctl.model.sharding import parse_mesh_shape

    if bits not in lib.BITS:
        raise UsageError(f"--bits {bits}: supported are 8 and 4")
    opts = lib.Options(bits=bits, group_size=group_size, embeddings=embeddings).validate()
    plan_mesh = parse_mesh_shape(mesh) if mesh else (1, 1)

    if evaluate_only:
        report = lib.evaluate(src, dst, mesh=mesh, end_to_end=not no_eval)
        _emit_report(report, json_out)
        return
    if dry_run:
        p = lib.plan(src, dst, opts, mesh=plan_mesh)
        if json_out:
            emit_json(p.to_json())
        else:
            _print_plan(p)
        return

    start = time.perf_counter()
    with progress("bytes") as bar:
        task = bar.add_task("quantize", total=None)
        last = [start, 0]

        def on_progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name.rsplit("/", 2)[-2])
            now = time.perf_counter()
            if not err.is_terminal and now - last[0] >= 10:  # a line every 10 s in logs
                rate = (done - last[1]) / (now - last[0])
                info(
                    f"quantize: {human_bytes(done)} of {human_bytes(total)} "
                    f"({human_bytes(rate)}/s) {name}"
                )
                last[:] = [now, done]

        result = lib.quantize(
            src,
            dst,
            opts,
            force=force,
            evaluate_model=not no_eval,
            eval_mesh=mesh,
            on_progress=on_progress,
            log=info,
        )
    info(
        f"quantized {human_bytes(result.plan.source_bytes)} in {result.seconds:.1f} s "
        f"({human_bytes(result.gb_per_s * 1e9)}/s) -> {dst} ({human_bytes(result.plan.output_bytes)})"
    )
    _emit_report(result.report(), json_out)


def _print_plan(p: Any) -> None:
    d = p.to_json()
    group = f", group {d['group_size']}" if d["bits"] == 4 else ""
    out.print(
        f"{d['source']} ({d['source_format']}) -> {d['destination']}: {d['bits']}-bit{group}, "
        f"embeddings {d['embeddings']}; {d['quantized_tensors']} of {d['tensors']} tensors quantized"
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="Files", title_justify="left")
    table.add_column("file")
    table.add_column("tensors", justify="right")
    table.add_column("bytes", justify="right")
    for s in d["shards"]:
        table.add_row(s["file"], str(s["tensors"]), human_bytes(s["bytes"]))
    table.add_row("total (tensor data)", str(d["tensors"]), human_bytes(d["output_bytes"]))
    emit_table(table)
    dev = d["per_device"]
    m = d["mesh"]
    short = d["free_bytes"] is not None and d["free_bytes"] < d["needed_bytes"]
    out.print(
        f"source {human_bytes(d['source_bytes'])} -> output {human_bytes(d['output_bytes'])}; "
        f"disk needed {human_bytes(d['needed_bytes'])}, free {human_bytes(d['free_bytes'] or 0)}"
        + (" (not enough: quantize would stop here)" if short else "")
    )
    out.print(
        f"per device on a {m['data']}x{m['model']} mesh (batch {dev['batch']}, seq {dev['seq_len']}): "
        f"weights {human_bytes(dev['weights'])} + KV cache {human_bytes(dev['kv_cache'])} + "
        f"working {human_bytes(dev['working'])} = {human_bytes(dev['total'])}"
    )
    for f in d["group_size_fallbacks"]:
        out.print(
            f"group size {f['group_size']} for {f['name']} "
            f"({d['group_size']} does not divide K = {f['contracting']})"
        )


def _emit_report(report: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(report)
        return
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"Per tensor ({report['bits']}-bit, embeddings {report['embeddings']})",
        title_justify="left",
    )
    for col in ("tensor", "kind", "group", "method", "rel RMS err", "max |err|"):
        table.add_column(col, justify="left" if col in ("tensor", "kind", "method") else "right")
    for t in report["tensors"]:
        table.add_row(
            t["name"],
            t["kind"],
            str(t["group_size"] or ""),
            t["method"],
            f"{t['rel_rms_error']:.4f}",
            f"{t['max_abs_error']:.4g}",
        )
    emit_table(table)
    for f in report["group_size_fallbacks"]:
        out.print(f"group size {f['group_size']} for {f['name']} (K = {f['contracting']})")
    e2e = report.get("end_to_end")
    if e2e:
        out.print(
            f"end to end ({e2e['probes']} probes, {e2e['positions']} positions): "
            f"top-1 agreement {e2e['top1_agreement']:.4f}, KL mean {e2e['kl_mean']:.3g} "
            f"max {e2e['kl_max']:.3g}, max |delta logit| {e2e['max_abs_logit_delta']:.4g}, "
            f"greedy {e2e['greedy_tokens']} tokens: prefix agreement "
            f"{e2e['greedy_prefix_agreement']:.4f}, token agreement "
            f"{e2e['greedy_token_agreement']:.4f}"
        )


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
