"""Routing audit: which experts the router picks, how evenly, and whether top-2 holds.

Collected on the device inside the engine's own prefill/decode programs (Engine.start_routing:
RouterStats summed step by step, no second engine), then derived here on the host:

    load[l, e]          = counts[l, e] / (tokens[l] * k)            fraction of assignments
    load_cv[l]          = std_e(counts) / mean_e(counts)            0 = perfectly balanced
    max_over_mean[l]    = max_e(counts) / mean_e(counts)            1 = balanced, E/k = collapse
    kl_to_uniform[l]    = sum_e load log(E * load)    (nats)        0 = balanced
    router_entropy[l]   = mean over tokens of H(router probs) / log E    in [0, 1]
    importance_cv[l]    = std_e(prob_mass) / mean_e(prob_mass)      soft-probability balance

Shapes: L layers, E experts, k experts per token. Library only (no CLI import): `collect`,
`write_report`, `summary_table`, `check_report_dir` are what `generate`, `bench` and the API
call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from grokctl.errors import MissingResourceError
from grokctl.model.moe import GATE_SUM_SLACK, RouterStats

SCHEMA = "grokctl.routing/1"
JSON_NAME = "routing.json"
LOAD_PNG = "routing-load.png"
COACT_PNG = "routing-coactivation.png"
INVARIANTS = ("not_distinct", "gate_out_of_range", "gate_sum_over_1")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@dataclasses.dataclass
class RoutingStats:
    """Routing sums on the host (numpy), as the device accumulated them. Add two to merge."""

    top_k: int
    tokens: np.ndarray  # [L] int64: tokens counted (the same in every layer)
    counts: np.ndarray  # [L, E] int64: hard top-k assignments
    gate_mass: np.ndarray  # [L, E] f64: sum of applied top-k gate weights
    prob_mass: np.ndarray  # [L, E] f64: sum of router softmax probabilities
    coactivation: np.ndarray  # [L, E, E] int64: tokens choosing both i and j (diagonal: e)
    entropy: np.ndarray  # [L] f64: sum over tokens of the router entropy (nats)
    violations: np.ndarray  # [L, 3] int64: see INVARIANTS

    @classmethod
    def from_device(cls, rs: RouterStats, top_k: int) -> RoutingStats:
        i, f = np.int64, np.float64
        return cls(
            top_k,
            np.asarray(rs.tokens, i),
            np.asarray(rs.counts, i),
            np.asarray(rs.gate_mass, f),
            np.asarray(rs.prob_mass, f),
            np.asarray(rs.coactivation, i),
            np.asarray(rs.entropy, f),
            np.asarray(rs.violations, i),
        )

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RoutingStats:
        """Back from a routing.json document (floats as rounded there)."""
        rows = doc["per_layer"]

        def col(key: str, dtype: Any) -> np.ndarray:
            return np.array([r[key] for r in rows], dtype)

        return cls(
            int(doc["top_k"]),
            col("tokens", np.int64),
            col("counts", np.int64),
            col("gate_mass", np.float64),
            col("prob_mass", np.float64),
            np.array(doc["coactivation"], np.int64),
            col("entropy_sum", np.float64),
            np.array([[r["violations"][n] for n in INVARIANTS] for r in rows], np.int64),
        )

    def __add__(self, other: RoutingStats) -> RoutingStats:
        fields = [f.name for f in dataclasses.fields(self) if f.name != "top_k"]
        return RoutingStats(self.top_k, *(getattr(self, n) + getattr(other, n) for n in fields))

    @property
    def layers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.max()) if self.tokens.size else 0

    # --- derived, per layer (NaN where no token was counted) ------------------------------
    def load(self) -> np.ndarray:
        """[L, E] fraction of the layer's assignments that went to each expert."""
        return _div(self.counts, self.counts.sum(axis=1, keepdims=True))

    def load_cv(self) -> np.ndarray:
        return _cv(self.counts)

    def max_over_mean(self) -> np.ndarray:
        return _div(self.counts.max(axis=1), self.counts.mean(axis=1))

    def kl_to_uniform(self) -> np.ndarray:
        p = self.load()
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(self.experts * np.where(p > 0, p, 1.0)), 0.0)
        return np.where(np.isnan(p).any(axis=1), np.nan, terms.sum(axis=1))

    def router_entropy(self) -> np.ndarray:
        """[L] mean per-token entropy of the router probabilities / log E, in [0, 1]."""
        return _div(self.entropy, self.tokens * math.log(self.experts))

    def importance_cv(self) -> np.ndarray:
        return _cv(self.prob_mass)

    def mean_gate_sum(self) -> np.ndarray:
        """[L] mean over tokens of the sum of the k applied gates (the rest of the router's
        probability mass goes to no expert: Grok-1 does not renormalise)."""
        return _div(self.gate_mass.sum(axis=1), self.tokens)

    def coactivation_rate(self) -> np.ndarray:
        """[L, E, E] fraction of tokens that chose both experts (diagonal: chose e)."""
        return _div(self.coactivation, self.tokens[:, None, None])

    def invariants_ok(self) -> bool:
        return not self.violations.any()

    def to_json(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        load, cv, mm = self.load(), self.load_cv(), self.max_over_mean()
        kl, ent, icv, gsum = (
            self.kl_to_uniform(),
            self.router_entropy(),
            self.importance_cv(),
            self.mean_gate_sum(),
        )
        per_layer = []
        for i in range(self.layers):
            per_layer.append(
                {
                    "layer": i,
                    "tokens": int(self.tokens[i]),
                    "counts": self.counts[i].tolist(),
                    "load": _floats(load[i]),
                    "gate_mass": _floats(self.gate_mass[i]),
                    "prob_mass": _floats(self.prob_mass[i]),
                    "load_cv": _float(cv[i]),
                    "max_over_mean": _float(mm[i]),
                    "kl_to_uniform": _float(kl[i]),
                    "router_entropy": _float(ent[i]),
                    "entropy_sum": _float(self.entropy[i]),
                    "importance_cv": _float(icv[i]),
                    "mean_gate_sum": _float(gsum[i]),
                    "violations": dict(zip(INVARIANTS, map(int, self.violations[i]))),
                }
            )
        total = self.violations.sum(axis=0)
        return {
            "schema": SCHEMA,
            "layers": self.layers,
            "experts": self.experts,
            "top_k": self.top_k,
            "tokens": self.num_tokens,
            "invariants": {
                "ok": self.invariants_ok(),
                "token_layers_checked": int(self.tokens.sum()),
                **dict(zip(INVARIANTS, map(int, total))),
                "gate_sum_slack": GATE_SUM_SLACK,
            },
            "summary": {
                "load_cv_mean": _float(_nanmean(cv)),
                "load_cv_max": _float(_nanmax(cv)),
                "max_over_mean_max": _float(_nanmax(mm)),
                "kl_to_uniform_mean": _float(_nanmean(kl)),
                "router_entropy_mean": _float(_nanmean(ent)),
            },
            "per_layer": per_layer,
            "coactivation": self.coactivation.tolist(),
            "files": {"load_heatmap": LOAD_PNG, "coactivation_heatmap": COACT_PNG},
            "meta": meta or {},
        }


def _div(a: np.ndarray, b: Any) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(b) > 0, np.asarray(a, np.float64) / b, np.nan)


def _cv(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return _div(x.std(axis=1), x.mean(axis=1))


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def _nanmax(x: np.ndarray) -> float:
    return float(np.nanmax(x)) if np.isfinite(x).any() else math.nan


def _float(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def _floats(xs: np.ndarray) -> list[float | None]:
    return [_float(x) for x in xs]


# --- collection ---------------------------------------------------------------------------
class Collection:
    """A running collection on an engine; `stop()` returns the RoutingStats."""

    def __init__(self, engine: Any, stop_at_eos: bool = True):
        self.engine = engine
        self.stats: RoutingStats | None = None
        engine.start_routing(stop_at_eos=stop_at_eos)

    def stop(self) -> RoutingStats:
        if self.stats is None:
            raw = self.engine.stop_routing()
            self.stats = RoutingStats.from_device(raw, self.engine.cfg.num_selected_experts)
        return self.stats

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def collect(engine: Any, stop_at_eos: bool = True) -> Collection:
    """Start summing routing statistics over every token the engine's prefill/decode/forward
    processes (its own programs, plus one statistics variant compiled once per shape):

        with routing.collect(model.engine) as rec:
            model.generate(...)
        routing.write_report(out_dir, rec.stats)

    Not counted: pad ids (0), batch-padding rows, and with `stop_at_eos` a row's tokens once
    its EOS has been fed back."""
    return Collection(engine, stop_at_eos)


# --- report ---------------------------------------------------------------------------------
def check_report_dir(path: str | os.PathLike[str], flag: str = "--routing-report") -> Path:
    """Create `path` and check a file can be written there (before any long work)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".grokctl-write-check"):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise MissingResourceError(f"{flag} {out}: cannot write a report there ({why})") from None
    return out


def write_report(
    out_dir: str | os.PathLike[str],
    stats: RoutingStats,
    meta: dict[str, Any] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """routing.json and the two PNG heatmaps into `out_dir` (each written under a temporary
    name, then renamed). Returns the paths written."""
    out = check_report_dir(out_dir)
    paths = {"json": out / JSON_NAME}
    _atomic_write(paths["json"], lambda f: f.write(json.dumps(stats.to_json(meta), indent=1)))
    if plots:
        paths["load"] = out / LOAD_PNG
        paths["coactivation"] = out / COACT_PNG
        _save_figure(_load_figure(stats), paths["load"])
        _save_figure(_coactivation_figure(stats), paths["coactivation"])
    return paths


def _atomic_write(path: Path, write: Any, binary: bool = False) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() would have made
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> None:
    plt = _pyplot()
    try:
        _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    finally:
        plt.close(fig)


def _load_figure(stats: RoutingStats) -> Any:
    plt = _pyplot()
    n_layers, n_exp = stats.layers, stats.experts
    load = stats.load()
    fig, ax = plt.subplots(
        figsize=(1.2 + 0.55 * n_exp, 1.4 + 0.32 * n_layers), constrained_layout=True
    )
    im = ax.imshow(load, cmap="viridis", vmin=0, aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_exp))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    if n_layers * n_exp <= 32 * 16:
        for (i, j), v in np.ndenumerate(load):
            if np.isfinite(v):
                color = "white" if v < np.nanmax(load) * 0.6 else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(
        f"expert load (share of top-{stats.top_k} assignments), "
        f"{stats.num_tokens} tokens; uniform = {1 / n_exp:.3f}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def _coactivation_figure(stats: RoutingStats) -> Any:
    plt = _pyplot()
    n_layers, n_exp = stats.layers, stats.experts
    rate = stats.coactivation_rate().copy()
    idx = np.arange(n_exp)
    rate[:, idx, idx] = np.nan  # the diagonal (the load) would swamp the pairs
    cols = min(n_layers, 4 if n_layers <= 16 else 8)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(2.0 * cols + 1.0, 2.0 * rows + 0.6),
        squeeze=False,
        constrained_layout=True,
    )
    vmax = float(np.nanmax(rate)) if np.isfinite(rate).any() else 1.0
    cmap = plt.get_cmap("magma").with_extremes(bad="#dddddd")
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= n_layers:
            ax.axis("off")
            continue
        im = ax.imshow(rate[i], cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {i}", fontsize=8)
        ticks = range(n_exp) if n_exp <= 16 else []
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=6, length=0)
    fig.suptitle(
        "expert co-activation: share of tokens routed to both i (row) and j (column)",
        fontsize=9,
    )
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8)
    return fig


def summary_table(stats: RoutingStats, max_rows: int = 16) -> Any:
    """A rich Table: one row per layer (the `max_rows` most imbalanced when there are more)."""
    from rich.table import Table

    cv, mm, kl, ent = (
        stats.load_cv(),
        stats.max_over_mean(),
        stats.kl_to_uniform(),
        stats.router_entropy(),
    )
    load = stats.load()
    rows = list(range(stats.layers))
    caption = None
    if len(rows) > max_rows:
        rows = sorted(np.argsort(-np.nan_to_num(cv, nan=-1.0))[:max_rows].tolist())
        caption = f"the {max_rows} most imbalanced of {stats.layers} layers; all in {JSON_NAME}"
    inv = stats.violations.sum(axis=0)
    title = (
        f"routing: {stats.num_tokens} tokens, {stats.experts} experts, top-{stats.top_k}; "
        f"invariant violations {int(inv.sum())}"
        + (" (" + ", ".join(f"{n} {int(v)}" for n, v in zip(INVARIANTS, inv) if v) + ")")
        * bool(inv.any())
    )
    table = Table(title=title, caption=caption, title_justify="left")
    for col in ("layer", "load CV", "max/mean", "KL→uniform", "entropy", "busiest", "idlest"):
        table.add_column(col, justify="right")

    def fmt(x: float, spec: str = ".3f") -> str:
        return "-" if not np.isfinite(x) else format(x, spec)

    for i in rows:
        busy = idle = "-"
        if np.isfinite(load[i]).all():
            b, s = int(np.argmax(load[i])), int(np.argmin(load[i]))
            busy, idle = f"e{b} {load[i, b]:.0%}", f"e{s} {load[i, s]:.0%}"
        table.add_row(str(i), fmt(cv[i]), fmt(mm[i], ".2f"), fmt(kl[i]), fmt(ent[i]), busy, idle)
    return table
