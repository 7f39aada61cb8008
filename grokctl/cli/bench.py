"""`grokctl bench`: llama-bench's cases and output for a checkpoint, with rooflines (docs/bench.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from grokctl.cli import options
from grokctl.cli.output import err, info
from grokctl.config import Settings, default
from grokctl.errors import UsageError


def bench(
    directory: Annotated[
        Path | None,
        typer.Argument(
            help="Checkpoint directory (or -c). Env: GROKCTL_CHECKPOINT.",
            metavar="CKPT",
            show_default=False,
        ),
    ] = None,
    checkpoint: options.Checkpoint = None,
    prompts: Annotated[
        str, typer.Option("-p", "--n-prompt", help="Prompt cases pp<P>, comma list; 0 = none.")
    ] = "512",
    gens: Annotated[
        str, typer.Option("-n", "--n-gen", help="Generation cases tg<N>, comma list; 0 = none.")
    ] = "128",
    depths: Annotated[
        str,
        typer.Option(
            "-d", "--n-depth", help="Context depth: tokens already in the cache, comma list."
        ),
    ] = "0",
    batches: Annotated[
        str, typer.Option("-b", "--batch-size", help="Sequences per step, comma list.")
    ] = "1",
    reps: Annotated[str, typer.Option("-r", "--repetitions", help="Timed runs per case.")] = "5",
    moe: Annotated[
        str, typer.Option("--moe", help="MoE kernel(s): sparse, dense or sparse,dense.")
    ] = "sparse",
    decode_steps: Annotated[
        int,
        typer.Option(
            "--decode-steps",
            min=1,
            max=64,
            help="tg: decode steps per device call, as generate's --decode-steps.",
        ),
    ] = default("decode_steps"),
    output: Annotated[
        str, typer.Option("-o", "--output", help="Output format: md, json, jsonl or csv.")
    ] = "md",
    save: Annotated[
        Path | None,
        typer.Option("--save", help="Also write the records as JSON to FILE (for --compare)."),
    ] = None,
    compare_to: Annotated[
        Path | None,
        typer.Option(
            "--compare", help="Earlier run's JSON: print each case's ratio; exit 1 on a regression."
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", min=0.0, max=1.0, help="Allowed slowdown for --compare."),
    ] = 0.1,
    plot_path: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Draw tok/s vs batch size and context depth (a panel for each that varies) to FILE.png.",
        ),
    ] = None,
    mesh: options.Mesh = None,
    layout: options.Layout = None,
    preset: options.Preset = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random prompt tokens.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Same as -o json.")] = False,
    routing_report: Annotated[
        Path | None,
        typer.Option(
            "--routing-report",
            metavar="DIR",
            help="Also write the routing statistics of every timed token to DIR (routing.json, "
            "heatmaps; DIR/sparse and DIR/dense with both kernels), from an untimed replay.",
        ),
    ] = None,
) -> None:
    """Time prompt processing (pp) and generation (tg) for every combination of the given cases:
    mean ± sd tok/s (warm-up and compilation apart), latency percentiles, and the achieved
    weight GB/s and FLOP/s against this machine's measured memory bandwidth and matmul peak."""
    from grokctl import bench as lib

    s = Settings("bench")
    output = "json" if json_out else output
    ckpt = directory if directory is not None else s.get("checkpoint", checkpoint, kind=Path)
    if ckpt is None:
        raise UsageError("no checkpoint: give CKPT or -c DIR")
    if output not in lib.FORMATS:
        raise UsageError(f"-o {output!r}: choose one of {', '.join(lib.FORMATS)}")
    rep_list = lib.parse_list(reps, "-r", minimum=1)
    if len(rep_list) != 1:
        raise UsageError(f"-r {reps!r}: one repetition count")
    spec = lib.BenchSpec(
        prompts=lib.parse_list(prompts, "-p"),
        gens=lib.parse_list(gens, "-n"),
        depths=lib.parse_list(depths, "-d"),
        batches=lib.parse_list(batches, "-b", minimum=1),
        moes=lib.parse_moe(moe),
        reps=rep_list[0],
        decode_steps=decode_steps,
    )
    for path, flag in ((save, "--save"), (plot_path, "--plot")):
        if path is not None:
            lib.check_writable(path, flag)
    if routing_report is not None:
        lib.routing_dirs(routing_report, spec.moes)  # before any weight is loaded (exit 4)
    old = lib.load_records(compare_to) if compare_to is not None else None
    mesh_text = s.get("mesh", mesh)
    _, cases, model = lib.prepare(str(ckpt), spec, mesh_text, s.get("preset", preset))
    if old is not None and compare_to is not None:
        lib.check_same_model(old, model, compare_to)

    live = err.is_terminal

    def on_case(i: int, n: int, case: lib.Case, done: int, of: int) -> None:
        if live:
            sys.stderr.write(
                f"\r\033[K[{i}/{n}] {case.label} b{case.batch} {case.moe}: {done}/{of}"
            )
            sys.stderr.flush()

    def on_load(done: int, total: int) -> None:
        if live:
            sys.stderr.write(f"\r\033[Kloading {done / 1e9:.2f} / {total / 1e9:.2f} GB")
            sys.stderr.flush()

    run = lib.run_bench(
        str(ckpt),
        spec,
        mesh=mesh_text,
        preset=s.get("preset", preset),
        layout=s.get("layout", layout, "tensor"),
        seed=seed,
        on_case=on_case,
        on_load=on_load,
        routing_report=routing_report,
    )
    if live:
        sys.stderr.write("\r\033[K")
    sys.stdout.write(lib.render(run.records, output))
    sys.stdout.flush()
    _print_routing(run)
    if save is not None:
        lib.write_atomic(save, lib.render(run.records, "json").encode())
    if plot_path is not None:
        lib.plot(run.records, plot_path)
        info(f"plot written to {plot_path}")
    if old is not None:
        rows, regressed = lib.compare(old, run.records, tolerance)
        text = lib.compare_text(rows, tolerance)
        (sys.stdout if output == "md" else sys.stderr).write("\n" + text)
        if regressed:
            worst = min(regressed, key=lambda r: r["ratio"])
            raise lib.Regression(
                f"{len(regressed)} of {len(rows)} cases regressed past --tolerance {tolerance} "
                f"against {compare_to} (worst: {worst['test']} d{worst['depth']} "
                f"b{worst['batch']} {worst['moe']} at {worst['ratio']:.3f}x)"
            )


def _print_routing(run: Any) -> None:
    """The one-screen routing summary of each kernel, on stderr (stdout keeps the records)."""
    from grokctl import routing

    for moe, stats in run.routing_stats.items():
        if len(run.routing_stats) > 1:
            info(f"[bold]--moe {moe}[/]")
        err.print(routing.summary_table(stats))
        paths = ", ".join(str(p) for p in run.routing_files[moe].values())
        info(f"[dim]routing report: {paths}[/]")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
