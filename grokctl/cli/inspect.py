"""`grokctl inspect`: what a checkpoint holds and whether it fits a mesh, from the index alone."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from grokctl.cli import layout, options
from grokctl.cli.output import emit_json, warn
from grokctl.config import Settings, help_suffix
from grokctl.errors import UsageError
from grokctl.paths import shown
from grokctl.units import binary_bytes, human_count

_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # int8, int4 as they are


def _shape(shape: Any) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def inspect(
    directory: options.CheckpointArg = None,
    checkpoint: options.Checkpoint = None,
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
            "--device-memory",
            help="Memory per device: 80 (GiB), 80GB, 24GiB. "
            f"{help_suffix('device_memory', default_text='detected')}",
            show_default=False,
        ),
    ] = None,
    pattern: Annotated[
        str | None,
        typer.Option("--filter", help="Only parameters whose path matches this regex."),
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", help="Only parameters of decoder layer N.")
    ] = None,
    tensors: Annotated[
        bool,
        typer.Option(
            "--tensors", help="Also list every tensor (file, shape, dtype, spec, shard, bytes)."
        ),
    ] = False,
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
    """What a checkpoint holds and whether it fits a mesh: totals, a per-device memory plan
    (weights + KV cache + working space) and a fits verdict; with --tensors every parameter's
    file, shape, dtype, int8 layout, bytes, partition spec and per-device shard. Reads no tensor
    data; `--preset grok-1` with no files works from shapes alone."""
    from grokctl import inspect as lib
    from grokctl.model.sharding import parse_mesh_shape

    s = Settings("inspect")
    layout_name = s.get("layout", layout)
    given = directory is not None or checkpoint is not None
    if show_rules and not given and preset is None:
        _print_rules(lib.rules_table(layout_name), layout_name, json_out)
        return
    ckpt = options.checkpoint(s, directory, checkpoint) if given or not preset else None
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
        sys.stdout.write("\n")
    _print_report(report, tensors or pattern is not None or layer is not None)


def _print_rules(
    rows: list[dict[str, Any]], layout_name: str, json_out: bool, tensors: Any = None
) -> None:
    if json_out:
        emit_json({"layout": layout_name, "rules": rows})
        return
    width = layout.line_width()
    header = ["kind", "parameter path regex / activation", "spec"]
    cells = [[row["kind"], row["pattern"], row["spec"]] for row in rows]
    if tensors is not None:  # how many tensors each parameter rule places
        header.append("tensors")
        for row, line in zip(rows, cells):
            hits = sum(t.rule == row["pattern"] for t in tensors)
            line.append(str(hits) if row["kind"] == "parameter" else "")
    title = f"Partition rules (layout {layout_name}; first match wins)"
    right = [False, False, False, True][: len(header)]
    lines = [*layout.wrap(title, width, "  "), *layout.table(header, cells, right, width, key=1)]
    sys.stdout.write("\n".join(lines) + "\n")


def _print_report(report: Any, with_tensors: bool) -> None:
    """Plain text laid out to the terminal's width (wrapped, never cut): the model line, the
    tensor listing (with --tensors), totals, the memory plan and the verdict."""
    width = layout.line_width()
    cfg, plan, totals = report.config, report.plan, report.totals()
    lines = layout.wrap(
        f"{report.location} ({report.source}): {cfg.num_layers} layers, emb {cfg.emb_size}, "
        f"{cfg.num_q_heads} q / {cfg.num_kv_heads} kv heads x {cfg.key_size}, "
        f"{cfg.num_experts} experts top-{cfg.num_selected_experts}, ffn {cfg.ffn_size}, "
        f"vocab {cfg.vocab_size}, context {cfg.sequence_len}",
        width,
        "  ",
    )
    if with_tensors:
        lines += ["", *_tensor_lines(report, totals, width)]
    lines += ["", *_totals_lines(totals, width), "", *_plan_lines(report, width)]
    lines += layout.wrap(_verdict(plan), width, "  ")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _tensor_lines(report: Any, totals: dict[str, Any], width: int | None) -> list[str]:
    plan = report.plan
    title = (
        f"Tensors ({totals['selected_tensors']} of {totals['tensors']}) on a "
        f"{plan.data}x{plan.model} mesh (data x model), layout {report.layout}; bytes exact"
    )
    header = ["parameter", "file", "shape", "dtype", "scales", "on disk", "spec", "shard",
              "per device"]  # fmt: skip
    right = [False, False, False, False, False, True, False, False, True]
    rows = []
    for t in report.selected:
        scales = f"bf16 {_shape(t.scales_shape)}" if t.quantized else ""
        if t.quantized and t.scales_spec != t.spec:
            scales += f" ({t.scales_spec})"  # e.g. 8 scale blocks kept whole over 16 devices
        rows.append([
            shown(t.name, 200), t.file.rsplit("/", 1)[-1], _shape(t.shape),
            _DTYPES.get(t.dtype, t.dtype), scales, f"{t.file_bytes:,}", t.spec,
            _shape(t.shard_shape), f"{t.device_bytes:,}",
        ])  # fmt: skip
    if not rows:
        return [*layout.wrap(title, width, "  "), "  (no parameter matches)"]
    return [*layout.wrap(title, width, "  "), *layout.table(header, rows, right, width)]


def _totals_lines(totals: dict[str, Any], width: int | None) -> list[str]:
    active = totals["active_parameters_per_token"]
    if totals["int4_tensors"]:
        kind = ["tensors (int4)", f"{totals['tensors']} ({totals['int4_tensors']})"]
    else:
        kind = ["tensors (int8)", f"{totals['tensors']} ({totals['int8_tensors']})"]
    rows = [
        kind,
        ["parameters", f"{totals['parameters']:,} ({human_count(totals['parameters'])})"],
        ["active parameters per token", f"{active:,} ({human_count(active)})"],
        ["bytes on disk", f"{totals['bytes_on_disk']:,} ({_size(totals['bytes_on_disk'])})"],
    ]
    if totals["selected_tensors"] != totals["tensors"]:
        rows.append(["selected: on disk", f"{totals['selected_bytes_on_disk']:,}"])
        rows.append(["selected: per device", f"{totals['selected_device_bytes']:,}"])
    return ["Totals", *_pairs(rows, width)]


def _pairs(rows: list[list[str]], width: int | None) -> list[str]:
    """`name  value` lines, values aligned; a value that does not fit goes under its name."""
    w = max(len(r[0]) for r in rows)
    lines = []
    for name, value in rows:
        one = f"  {name.ljust(w)}  {value}"
        lines += [one] if width is None or len(one) <= width else [f"  {name}", f"    {value}"]
    return lines


def _plan_lines(report: Any, width: int | None) -> list[str]:
    cfg, plan, w = report.config, report.plan, report.plan.working
    padded = f" (padded to {plan.padded_batch})" if plan.padded_batch != plan.batch else ""
    title = (
        f"Memory per device: {plan.data}x{plan.model} mesh, batch {plan.batch}{padded}, "
        f"seq-len {plan.seq_len}"
    )
    packed = "int4 shards (2 per byte)" if report.totals()["int4_tensors"] else "int8 shards"
    parts = [
        ("weights", plan.weights, f"{packed} + bf16 scales + float arrays, from the specs"),
        ("KV cache", plan.kv_cache, f"bf16 k/v, {cfg.num_layers} layers, batch/data x seq-len"),
        (
            "working space",
            plan.working_total,
            f"dequant {w['dequant']:,} + residual {w['residual']:,} + logits {w['logits']:,} + "
            f"max(attention {w['attention']:,}, moe {w['moe']:,})",
        ),
        ("total", plan.total, ""),
    ]
    rows = [[name, binary_bytes(n, grouped=True), f"{n:,} B", how] for name, n, how in parts]
    mem = plan.device_memory
    rows.append(
        [
            "device memory",
            binary_bytes(mem, grouped=True) if mem else "unknown",
            f"{mem:,} B" if mem else "",
            shown(plan.device_memory_source, 200),
        ]
    )
    laid = layout.columns(
        ["part", "per device", "bytes"], [r[:3] for r in rows], [False, True, True], None
    )
    assert laid is not None
    lines = layout.wrap(title, width, "  ")
    for text, (*_, how) in zip(laid, [["", "", "", "how"], ["", "", "", ""], *rows]):
        one = f"  {text}  {how}" if how else f"  {text}"
        if width is None or len(one) <= width:
            lines.append(one)
        else:  # the explanation goes under its row, wrapped
            lines += layout.wrap(f"  {text}", width, "    ")
            lines += layout.wrap(f"      {how}", width, "      ")
    return lines


def _verdict(plan: Any) -> str:
    if plan.fits is None:
        return "verdict: unknown (pass --device-memory SIZE)"
    if plan.fits:
        pct = 100 * plan.total / plan.device_memory
        return f"verdict: fits: {binary_bytes(plan.total, grouped=True)} of {binary_bytes(plan.device_memory, grouped=True)} per device ({pct:.0f}%)"
    need = plan.total - plan.device_memory
    return (
        f"verdict: does not fit: needs {binary_bytes(plan.total, grouped=True)} per device, {binary_bytes(need, grouped=True)} more than "
        f"{binary_bytes(plan.device_memory, grouped=True)}; try more devices on the model axis "
        f"(--mesh {plan.data}x{plan.model * 2}), a smaller --batch or --seq-len"
    )


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
