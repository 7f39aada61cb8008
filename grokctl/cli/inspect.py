"""`grokctl inspect`: what a checkpoint holds and whether it fits a mesh, from the index alone."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from grokctl.cli import options
from grokctl.cli.output import emit_json, out, warn
from grokctl.config import Settings, help_suffix
from grokctl.errors import UsageError

_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # int8, int4 as they are


def _shape(shape: Any) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _gib(n: float) -> str:
    """Binary units (device memory is sold in GiB): 37.06 GiB, 192.00 MiB, 512 B."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):,.2f} {unit}"
    return f"{int(n)} B"


def _emit(table: Table) -> None:
    """A table on stdout; piped to a file or a pager it keeps its natural width (no folding)."""
    if out.is_terminal:
        out.print(table)
        return
    wide = out.options.update(max_width=1000)
    width = max(out.width, Measurement.get(out, wide, table).maximum)
    Console(file=sys.stdout, width=width, highlight=False, soft_wrap=True).print(table)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def inspect(
    directory: Annotated[
        Path | None,
        typer.Argument(
            help="Checkpoint directory (holding ckpt-0/). Env: GROKCTL_CHECKPOINT.",
            metavar="DIR",
            show_default=False,
        ),
    ] = None,
    preset: options.Preset = None,
    mesh: options.Mesh = None,
    layout: options.Layout = None,
    moe: options.MoeKernel = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            help=f"Sequences per step for the KV-cache plan. {help_suffix('batch')}",
            show_default=False,
        ),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            help="Context length for the plan. "
            f"{help_suffix('seq_len', default_text='the model' + chr(39) + 's')}",
            show_default=False,
        ),
    ] = None,
    device_memory: Annotated[
        str | None,
        typer.Option(
            "--device-memory", help="Memory per device: 80 (GiB), 80GB, 24GiB. Default: detected."
        ),
    ] = None,
    pattern: Annotated[
        str | None,
        typer.Option("--filter", help="Only parameters whose path matches this regex."),
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", min=0, help="Only parameters of decoder layer N.")
    ] = None,
    show_rules: Annotated[
        bool, typer.Option("--rules", help="Show the partition-rule table.")
    ] = False,
    bits: Annotated[
        int | None,
        typer.Option(
            "--bits",
            help="With --preset: plan a native checkpoint with 8- or 4-bit weights "
            "(default: the release's int8).",
        ),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            "--group-size",
            help="With --preset: rows per scale group along the contracting axis (default 128 "
            "with --bits 4).",
        ),
    ] = None,
    json_out: options.Json = False,
) -> None:
    """Every parameter's file, shape, dtype, int8 layout, bytes, partition spec and per-device shard,
    and a per-device memory plan (weights + KV cache + working space) with a fits verdict.
    Reads no tensor data; `--preset grok-1` with no files works from shapes alone."""
    from grokctl import inspect as lib
    from grokctl.model.sharding import parse_mesh_shape

    s = Settings("inspect")
    layout_name = s.get("layout", layout)
    if show_rules and directory is None and preset is None:
        _print_rules(lib.rules_table(layout_name), layout_name, json_out)
        return
    ckpt = (
        directory
        if directory is not None
        else (None if preset else s.get("checkpoint", None, kind=Path))
    )
    preset_name = s.get("preset", preset)
    if ckpt is None and preset_name is None:
        raise UsageError("nothing to inspect: give a checkpoint DIR or --preset NAME (e.g. grok-1)")

    if ckpt is not None:
        from grokctl.checkpoint.index import checkpoint_root
        from grokctl.config import assumed_preset

        root = checkpoint_root(ckpt)
        assumed = assumed_preset(root, preset_name)
        if assumed is not None and preset_name is None:
            warn(f"{root} has no config.json: assuming preset {assumed} (--preset chooses another)")
    mesh_text = s.get("mesh", mesh)
    mem_text = s.get("device_memory", device_memory)
    detected: tuple[int | None, str, int] | None = None
    if mesh_text is None or mem_text is None:
        detected = lib.detect_device_memory()
    shape = parse_mesh_shape(mesh_text) if mesh_text else (1, detected[2])  # type: ignore[index]
    mem: int | None
    if mem_text is not None:
        mem, source = lib.parse_memory(str(mem_text)), f"--device-memory {mem_text}"
    else:
        mem, source = detected[0], detected[1]  # type: ignore[index]

    report = lib.inspect(
        str(ckpt) if ckpt is not None else None,
        preset=preset_name,
        mesh=shape,
        layout=layout_name,
        batch=s.get("batch", batch),
        seq_len=s.get("seq_len", seq_len),
        device_memory=mem,
        device_memory_source=source,
        pattern=pattern,
        layer=layer,
        moe=s.get("moe", moe),
        bits=bits,
        group_size=group_size,
    )
    if json_out:
        result = report.to_json()
        if show_rules:
            result["rules"] = lib.rules_table(layout_name)
        emit_json(result)
        return
    if show_rules:
        _print_rules(lib.rules_table(layout_name), layout_name, False, report.tensors)
    _print_report(report)


def _print_rules(
    rows: list[dict[str, Any]], layout: str, json_out: bool, tensors: Any = None
) -> None:
    if json_out:
        emit_json({"layout": layout, "rules": rows})
        return
    table = Table(
        title=f"Partition rules (layout {layout}; first match wins)", title_justify="left"
    )
    for col in ("kind", "parameter path regex / activation", "spec"):
        table.add_column(col)
    if tensors is not None:
        table.add_column("tensors", justify="right")
    for row in rows:
        cells = [row["kind"], row["pattern"], row["spec"]]
        if tensors is not None:
            cells.append(
                str(sum(t.rule == row["pattern"] for t in tensors))
                if row["kind"] == "parameter"
                else ""
            )
        table.add_row(*cells)
    _emit(table)


def _print_report(report: Any) -> None:
    cfg, plan, totals = report.config, report.plan, report.totals()
    out.print(
        f"[bold]{report.location}[/] ({report.source}): {cfg.num_layers} layers, emb {cfg.emb_size}, "
        f"{cfg.num_q_heads} q / {cfg.num_kv_heads} kv heads x {cfg.key_size}, {cfg.num_experts} experts "
        f"top-{cfg.num_selected_experts}, ffn {cfg.ffn_size}, vocab {cfg.vocab_size}, context {cfg.sequence_len}"
    )
    table = Table(
        title=f"Tensors ({totals['selected_tensors']} of {totals['tensors']}) on a "
        f"{plan.data}x{plan.model} mesh (data x model), layout {report.layout}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("parameter", "file", "shape", "dtype", "scales", "on disk", "spec"):
        table.add_column(
            col,
            justify="right" if col == "on disk" else "left",
            no_wrap=col != "parameter",  # on a narrow terminal the path folds, numbers stay whole
            overflow="fold",
        )
    table.add_column("shard", no_wrap=True)
    table.add_column("per device", justify="right", no_wrap=True)
    for t in report.selected:
        scales = f"bf16 {_shape(t.scales_shape)}" if t.quantized else ""
        if t.quantized and t.scales_spec != t.spec:
            scales += f" ({t.scales_spec})"  # e.g. 8 scale blocks kept whole over 16 devices
        table.add_row(
            t.name,
            t.file.rsplit("/", 1)[-1],
            _shape(t.shape),
            _DTYPES.get(t.dtype, t.dtype),
            scales,
            f"{t.file_bytes:,}",
            t.spec,
            _shape(t.shard_shape),
            _size(t.device_bytes),
        )
    _emit(table)

    summary = Table(title="Totals", title_justify="left", show_header=False)
    summary.add_column(justify="left")
    summary.add_column(justify="right")
    if totals["int4_tensors"]:
        summary.add_row("tensors (int4)", f"{totals['tensors']} ({totals['int4_tensors']})")
    else:
        summary.add_row("tensors (int8)", f"{totals['tensors']} ({totals['int8_tensors']})")
    summary.add_row("parameters", f"{totals['parameters']:,} ({_count(totals['parameters'])})")
    active = totals["active_parameters_per_token"]
    summary.add_row("active parameters per token", f"{active:,} ({_count(active)})")
    summary.add_row(
        "bytes on disk", f"{totals['bytes_on_disk']:,} ({_size(totals['bytes_on_disk'])})"
    )
    if totals["selected_tensors"] != totals["tensors"]:
        summary.add_row("selected: on disk", f"{totals['selected_bytes_on_disk']:,}")
        summary.add_row("selected: per device", _size(totals["selected_device_bytes"]))
    _emit(summary)

    mem = Table(
        title=f"Memory per device: {plan.data}x{plan.model} mesh, batch {plan.batch}"
        + (f" (padded to {plan.padded_batch})" if plan.padded_batch != plan.batch else "")
        + f", seq-len {plan.seq_len}",
        title_justify="left",
    )
    mem.add_column("part")
    mem.add_column("per device", justify="right")
    mem.add_column("how", justify="left")
    w = plan.working
    packed = "int4 shards (2 per byte)" if totals["int4_tensors"] else "int8 shards"
    mem.add_row(
        "weights", _gib(plan.weights), f"{packed} + bf16 scales + float arrays, from the specs"
    )
    mem.add_row(
        "KV cache", _gib(plan.kv_cache), f"bf16 k/v, {cfg.num_layers} layers, batch/data x seq-len"
    )
    mem.add_row(
        "working space",
        _gib(plan.working_total),
        f"dequant {_gib(w['dequant'])} + residual {_gib(w['residual'])} + logits "
        f"{_gib(w['logits'])} + max(attention {_gib(w['attention'])}, moe {_gib(w['moe'])})",
    )
    mem.add_row("[bold]total[/]", f"[bold]{_gib(plan.total)}[/]", "")
    mem.add_row(
        "device memory",
        _gib(plan.device_memory) if plan.device_memory else "unknown",
        plan.device_memory_source,
    )
    _emit(mem)
    if plan.fits is None:
        out.print("verdict: unknown (pass --device-memory SIZE)")
    elif plan.fits:
        pct = 100 * plan.total / plan.device_memory
        out.print(
            f"[green]fits[/]: {_gib(plan.total)} of {_gib(plan.device_memory)} per device ({pct:.0f}%)"
        )
    else:
        need = plan.total - plan.device_memory
        out.print(
            f"[red]does not fit[/]: needs {_gib(plan.total)} per device, {_gib(need)} more than "
            f"{_gib(plan.device_memory)}; try more devices on the model axis (--mesh {plan.data}x{plan.model * 2}), a smaller "
            "--batch or --seq-len"
        )


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
