"""Bench records (one per case, every field documented in docs/bench.md), their output formats
(md | json | jsonl | csv), `--compare` against an earlier run, and `--plot`."""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grokctl import costmodel
from grokctl.bench.cases import CaseResult, percentiles_ms
from grokctl.config import ModelConfig
from grokctl.errors import GrokctlError, MissingResourceError, UsageError
from grokctl.units import binary_bytes, human_count

SCHEMA = "grokctl-bench/1"
FORMATS = ("md", "json", "jsonl", "csv")


def model_summary(
    cfg: ModelConfig, precision: costmodel.Precision, name: str, stored_bytes: int
) -> dict[str, Any]:
    """What identifies the model of a record: `--compare` refuses another `id`."""
    config = cfg.to_json_dict()
    digest = json.dumps({"config": config, "precision": precision.label}, sort_keys=True)
    return {
        "id": hashlib.sha256(digest.encode()).hexdigest()[:16],
        "name": name,
        "params": cfg.param_count(),
        "active_params": cfg.active_param_count(),
        "stored_bytes": stored_bytes,
        "summary": (
            f"D{cfg.emb_size} L{cfg.num_layers} H{cfg.num_q_heads}/{cfg.num_kv_heads}x"
            f"{cfg.key_size} E{cfg.num_experts}k{cfg.num_selected_experts} F{cfg.ffn_size} "
            f"V{cfg.vocab_size} ctx{cfg.sequence_len}"
        ),
        "config": config,
    }


def record(
    result: CaseResult,
    env: dict[str, Any],
    cfg: ModelConfig,
    tensors: list[tuple[str, int]],
    routing_json: Path | None = None,
) -> dict[str, Any]:
    """One case's record: its figures, their rooflines, and the run's environment `env`
    (commit, versions, devices, model, precision, hardware, load, bandwidth, matmul peak).
    `routing_json`: the routing.json the case's statistics are written into (--routing-report)."""
    c = result.case
    mean = result.mean
    weights = costmodel.decode_weight_bytes(cfg, c.batch, c.moe, tensors=tensors)
    if c.kind == "tg":
        mid_depth = c.depth + (c.tokens + 1) // 2  # the mean context of the N steps
        flops_token = costmodel.decode_flops(cfg, mid_depth, c.moe)
        kv_step = costmodel.kv_read_bytes(cfg, c.batch, mid_depth)
        weight_gb_s: float | None = weights.per_step * mean / c.batch / 1e9
    else:
        flops_token = costmodel.prefill_flops(cfg, c.tokens, c.depth, c.moe) / c.tokens
        kv_step, weight_gb_s = None, None
    bw = env["mem_bw_gb_s"]
    flop_s = flops_token * mean
    peak = max(env["matmul_peak_flop_s"].values())
    return {
        "schema": SCHEMA,
        "timestamp": env["timestamp"],
        "test": c.test,
        "kind": c.kind,
        "n_prompt": c.tokens if c.kind == "pp" else 0,
        "n_gen": c.tokens if c.kind == "tg" else 0,
        "depth": c.depth,
        "batch": c.batch,
        "moe": c.moe,
        "reps": len(result.tok_s),
        "decode_steps": env["decode_steps"] if c.kind == "tg" else None,
        "tok_s_mean": round(mean, 4),
        "tok_s_sd": round(result.sd, 4),
        "tok_s": [round(x, 4) for x in result.tok_s],
        "compile_s": round(result.compile_s, 3),
        "fill_s": round(result.fill_s, 3),
        "ttft_ms": percentiles_ms(result.ttft_s),
        "token_ms": percentiles_ms(result.token_s),
        "weight_bytes_per_step": weights.per_step,
        "weight_bytes_per_token": round(weights.per_token, 1),
        "weight_bytes_parts": weights.parts,
        "kv_bytes_per_step": kv_step,
        "weight_gb_s": None if weight_gb_s is None else round(weight_gb_s, 6),
        "mem_bw_gb_s": round(bw, 3),
        "mem_bw_probes_gb_s": [round(x, 3) for x in env["mem_bw_probes_gb_s"]],
        "mem_bw_method": env["mem_bw_method"],
        "roofline_pct": None if weight_gb_s is None else round(100 * weight_gb_s / bw, 4),
        "flops_per_token": flops_token,
        "flop_s": flop_s,
        "matmul_peak_flop_s": env["matmul_peak_flop_s"],
        "peak_pct": round(100 * flop_s / peak, 3),
        "load_s": env["load_s"],
        "load_gb_s": env["load_gb_s"],
        "host_rss_peak_bytes": result.host_rss_peak,
        "device_mem_peak_bytes": result.device_mem_peak,
        "commit": env["commit"],
        "versions": env["versions"],
        "backend": env["backend"],
        "device_kind": env["device_kind"],
        "device_count": env["device_count"],
        "mesh": env["mesh"],
        "model": env["model"],
        "precision": env["precision"],
        "hardware": env["hardware"],
        "kernels": env["kernels"],
        "checkpoint": env["checkpoint"],
        "routing": _routing_field(result, routing_json),
    }


def _routing_field(result: CaseResult, path: Path | None) -> dict[str, Any] | None:
    """With --routing-report: where this case's routing statistics went, how many tokens they
    count (B x tokens x reps: the timed repetitions' tokens) and whether the top-k invariants
    held on every one of them."""
    if result.routing is None or path is None:
        return None
    return {
        "report": str(path),
        "tokens": result.routing.num_tokens,
        "invariants_ok": result.routing.invariants_ok(),
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- formats ------------------------------------------------------------------------------------


def _si(x: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def _lat(r: dict[str, Any]) -> str:
    p = r["ttft_ms"] or r["token_ms"]
    return f"{p['p50']:.1f} / {p['p90']:.1f} / {p['p99']:.1f}" if p else ""


def to_markdown(records: Sequence[dict[str, Any]]) -> str:
    """A llama-bench-like table, then one line on the build, the machine and the rooflines."""
    head = [
        "model",
        "size",
        "params",
        "backend",
        "mesh",
        "moe",
        "batch",
        "test",
        "t/s",
        "ms p50/p90/p99",
        "weight GB/s (roofline)",
        "FLOP/s (peak)",
    ]
    rows = []
    for r in records:
        m = r["model"]
        gb = (
            ""
            if r["weight_gb_s"] is None
            else f"{r['weight_gb_s']:.2f} ({r['roofline_pct']:.1f} %)"
        )
        test = f"{r['test']} @ d{r['depth']}" if r["depth"] else r["test"]
        rows.append(
            [
                f"{m['name']} {r['precision']['weights']}",
                binary_bytes(m["stored_bytes"]),
                human_count(m["params"], 2),
                f"{r['backend']} x{_devices(r['mesh'])}",
                r["mesh"],
                r["moe"],
                str(r["batch"]),
                test,
                f"{r['tok_s_mean']:.2f} ± {r['tok_s_sd']:.2f}",
                _lat(r),
                gb,
                f"{_si(r['flop_s'], 'FLOP/s')} ({r['peak_pct']:.1f} %)",
            ]
        )
    right = {2, 6, 8, 9, 10, 11}
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "| " + " | ".join(
        ("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)
    )
    out = [line(head), rule + " |", *(line(r) for r in rows)]
    if records:
        r = records[0]
        peaks = ", ".join(f"{k} {_si(v, 'FLOP/s')}" for k, v in r["matmul_peak_flop_s"].items())
        compile_s = sum(x["compile_s"] for x in records)
        rss = max(x["host_rss_peak_bytes"] for x in records)
        dev = [x["device_mem_peak_bytes"] for x in records if x["device_mem_peak_bytes"]]
        probes = r.get("mem_bw_probes_gb_s") or []  # (records saved before the two probes: none)
        best_of = (
            f"best of {probes[0]:.1f} before / {probes[1]:.1f} after the cases; "
            if len(probes) == 2
            else ""
        )
        out += [
            "",
            f"build: {r['commit']} · jax {r['versions']['jax']} · {r['device_kind']} "
            f"x{r['device_count']} · {r['hardware']['cpu_model']} "
            f"({r['hardware']['cores_usable']} cores, {'/'.join(r['hardware']['cpu_flags'][:4])}...)"
            + _kernels_text(r.get("kernels")),
            f"load {r['load_s']:.2f} s ({r['load_gb_s']:.2f} GB/s) · compile {compile_s:.1f} s "
            f"(apart) · memory bandwidth {r['mem_bw_gb_s']:.1f} GB/s "
            f"({best_of}{r['mem_bw_method']}) · "
            f"matmul peak {peaks} · peak RSS {rss / 2**30:.2f} GiB"
            + (f" · device peak {max(dev) / 2**30:.2f} GiB" if dev else ""),
        ]
    return "\n".join(out) + "\n"


def _kernels_text(k: dict[str, Any] | None) -> str:
    """The build line's note on the native CPU kernels ('' where they did not run)."""
    if not k:
        return ""
    return f" · cpu kernels {k['isa']}, {k['threads']} threads, int8 logits {k['int8_logits']}"


def _devices(mesh: str) -> int:
    return math.prod(int(x) for x in mesh.split("x"))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            out[prefix + k] = json.dumps(v)
        else:
            out[prefix + k] = v
    return out


def render(records: Sequence[dict[str, Any]], fmt: str) -> str:
    if fmt == "md":
        return to_markdown(records)
    if fmt == "json":
        return json.dumps(list(records), indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    if fmt == "csv":
        rows = [_flat(r) for r in records]
        fields = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    raise UsageError(f"-o {fmt!r}: choose one of {', '.join(FORMATS)}")


# --- files ----------------------------------------------------------------------------------------


def check_writable(path: Path, flag: str) -> None:
    """Fail before the run (exit 4) when `path` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MissingResourceError(
            f"{flag} {path}: cannot write there (no such writable directory)"
        )


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MissingResourceError(f"{path}: cannot write ({exc.strerror})") from None


# --- compare -----------------------------------------------------------------------------------


class Regression(GrokctlError):
    """A case ran slower than the baseline by more than the tolerance (exit 1)."""


def load_records(path: Path) -> list[dict[str, Any]]:
    """Records of an earlier run: a json list (-o json / --save) or json lines (-o jsonl)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise MissingResourceError(f"--compare {path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise UsageError(f"--compare {path}: not bench JSON or JSON lines") from None
    records = data if isinstance(data, list) else [data]
    for r in records:
        if not isinstance(r, dict) or r.get("schema") != SCHEMA:
            got = r.get("schema") if isinstance(r, dict) else type(r).__name__
            raise UsageError(f"--compare {path}: schema {got!r}, expected {SCHEMA!r}")
    if not records:
        raise UsageError(f"--compare {path}: holds no records")
    return records


def check_same_model(old: Sequence[dict[str, Any]], model: dict[str, Any], path: Path) -> None:
    ids = {r["model"]["id"] for r in old}
    if ids != {model["id"]}:
        other = next(r["model"] for r in old if r["model"]["id"] != model["id"])
        raise UsageError(
            f"--compare {path}: another model ({other['name']}: {other['summary']}), "
            f"this run is {model['name']}: {model['summary']}"
        )


def _key(r: dict[str, Any]) -> tuple[str, int, int, str]:
    return (r["test"], r["depth"], r["batch"], r["moe"])


def compare(
    old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]], tolerance: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows for every case of `new`, the regressed ones): ratio = new / old mean tok/s; a case
    regressed when ratio < 1 - tolerance. Cases absent from `old` get ratio None."""
    base = {_key(r): r for r in old}
    rows = []
    for r in new:
        o = base.get(_key(r))
        ratio = r["tok_s_mean"] / o["tok_s_mean"] if o and o["tok_s_mean"] > 0 else None
        rows.append(
            {
                "test": r["test"],
                "depth": r["depth"],
                "batch": r["batch"],
                "moe": r["moe"],
                "old_tok_s": o["tok_s_mean"] if o else None,
                "new_tok_s": r["tok_s_mean"],
                "ratio": None if ratio is None else round(ratio, 4),
                "regressed": ratio is not None and ratio < 1 - tolerance,
            }
        )
    return rows, [r for r in rows if r["regressed"]]


def compare_text(rows: Sequence[dict[str, Any]], tolerance: float) -> str:
    lines = [f"compare (regression when ratio < {1 - tolerance:.2f}):"]
    for r in rows:
        test = f"{r['test']} @ d{r['depth']}" if r["depth"] else r["test"]
        old = "—" if r["old_tok_s"] is None else f"{r['old_tok_s']:.2f}"
        ratio = "new case" if r["ratio"] is None else f"{r['ratio']:.3f}x"
        flag = "  REGRESSED" if r["regressed"] else ""
        lines.append(
            f"  {test:<16} b{r['batch']:<4} {r['moe']:<6} {old:>10} -> "
            f"{r['new_tok_s']:>10.2f} t/s  {ratio}{flag}"
        )
    return "\n".join(lines) + "\n"


# --- plot ------------------------------------------------------------------------------------------


def plot(records: Sequence[dict[str, Any]], path: Path) -> None:
    """tok/s against batch size (one line per test, depth, kernel) and against context depth
    (one line per test, batch, kernel), as a PNG: a panel for each of the two that varies
    (the batch panel when neither does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [x for x in ("batch", "depth") if len({r[x] for r in records}) > 1] or ["batch"]
    fig, panels = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4.2), squeeze=False)
    for ax, x in zip(panels[0], axes, strict=True):
        group = "depth" if x == "batch" else "batch"
        series: dict[tuple[Any, ...], list[tuple[int, float, float]]] = {}
        for r in records:
            series.setdefault((r["test"], r[group], r["moe"]), []).append(
                (r[x], r["tok_s_mean"], r["tok_s_sd"])
            )
        for (test, g, moe), pts in sorted(series.items()):
            pts.sort()
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] for p in pts],
                marker="o",
                capsize=3,
                label=f"{test} {group[0]}{g} {moe}",
            )
        ax.set_xlabel("batch size" if x == "batch" else "context depth (tokens)")
        ax.set_ylabel("tokens / s")
        speeds = [r["tok_s_mean"] for r in records if r["tok_s_mean"] > 0]
        if speeds and max(speeds) > 50 * min(speeds):  # pp and tg apart by orders of magnitude
            ax.set_yscale("log")
        ticks = sorted({r[x] for r in records})
        if x == "batch" and len(ticks) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    r0 = records[0]
    sep = " · " if len(axes) > 1 else "\n"  # one panel: the title in two lines
    fig.suptitle(
        f"grokctl bench · {r0['model']['name']} ({r0['precision']['label']}){sep}"
        f"{r0['device_kind']} mesh {r0['mesh']} · {r0['commit'][:12]}",
        fontsize=9,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
