"""Mixture of experts: top-2 routing and sparse expert compute.

Shapes: N tokens (B*T), D emb_size, F ffn_size, E experts, k selected experts, b block size,
P padded assignment slots (a multiple of b).

Expert e: (gelu(x W[e]) * (x V[e])) W1[e]; output = sum over the k chosen experts of
gate * expert output, gates = the router softmax probabilities (not renormalised).

Kernels:
- "sparse" (default): sorted block dispatch. The N*k (token, expert) assignments are sorted by
  expert; each expert's run is padded to a multiple of b and cut into blocks of b rows; a scan
  over blocks gathers the block's tokens, reads *one* expert's int8 weights and dequantizes them
  inside the step. Blocks past the used ones are skipped with `lax.cond`, so a decode step reads
  only the experts its tokens chose (2 for one token), and prefill work is about N*k rows, not
  N*E.
- "dense": the reference's form, every expert on every token then a one-hot select
  (4x the work for Grok-1). Kept as a switchable baseline (`--moe dense`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from grokctl.config import ModelConfig
from grokctl.model.layers import BF16, F32, bf16_dot, round_bf16, scoped_param
from grokctl.model.quant import (
    QuantizedWeight8bit,
    qeinsum,
    qmatmul,
    qmatmul_rows,
    qmatmul_rows2,
    rows_kernel_ok,
    take_expert,
)

MOE_KERNELS = ("sparse", "dense")


def check_kernel(name: str) -> str:
    if name not in MOE_KERNELS:
        from grokctl.errors import UsageError

        raise UsageError(f"--moe {name!r}: choose one of: {', '.join(MOE_KERNELS)}")
    return name


def route(x: jax.Array, router_w: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router in f32: probs [N, E], top-k gates [N, k] (unnormalised), experts [N, k]."""
    logits = jnp.dot(x.astype(F32), router_w.astype(F32))
    probs = jax.nn.softmax(logits, axis=-1)
    gates, experts = jax.lax.top_k(probs, k)
    return probs, gates, experts


# Top-2 invariant "gates sum <= 1" holds exactly in real arithmetic; in f32 a softmax can sum to
# a few ulp over 1. Sums above 1 + GATE_SUM_SLACK (8 ulp at 1.0) count as violations.
GATE_SUM_SLACK = 1e-6


class RouterStats(NamedTuple):
    """Routing statistics summed over counted tokens (pad tokens excluded), one row per layer.

    A pytree of small arrays: carried through the compiled programs like the cache and added
    step by step on the device. L layers, E experts."""

    tokens: jax.Array  # [L] int32: tokens counted
    counts: jax.Array  # [L, E] int32: hard top-k assignments per expert (sum = tokens * k)
    gate_mass: jax.Array  # [L, E] f32: sum of the top-k gate weights applied to expert e
    prob_mass: jax.Array  # [L, E] f32: sum of router softmax probabilities of e (all tokens)
    coactivation: jax.Array  # [L, E, E] int32: tokens whose chosen set holds both i and j
    entropy: jax.Array  # [L] f32: sum over tokens of -sum_e p log p of the router probs (nats)
    violations: jax.Array  # [L, 3] int32: tokens breaking (distinct, gate in (0, 1], sum <= 1)

    @staticmethod
    def zeros(layers: int, experts: int) -> RouterStats:
        i32, f32 = jnp.int32, jnp.float32
        return RouterStats(
            jnp.zeros((layers,), i32),
            jnp.zeros((layers, experts), i32),
            jnp.zeros((layers, experts), f32),
            jnp.zeros((layers, experts), f32),
            jnp.zeros((layers, experts, experts), i32),
            jnp.zeros((layers,), f32),
            jnp.zeros((layers, 3), i32),
        )


def router_stats(
    probs: jax.Array, gates: jax.Array, experts: jax.Array, count: jax.Array
) -> RouterStats:
    """One layer's statistics (no leading L axis): probs [N, E] f32, gates [N, k] f32,
    experts [N, k] int32, count [N] bool (tokens to count)."""
    e = probs.shape[-1]
    w = count.astype(jnp.int32)  # [N]
    wf = count.astype(F32)
    chosen = jax.nn.one_hot(experts, e, dtype=jnp.int32)  # [N, k, E]
    counts = jnp.einsum("n,nke->e", w, chosen)
    gate_mass = jnp.einsum("n,nk,nke->e", wf, gates, chosen.astype(F32))
    prob_mass = jnp.einsum("n,ne->e", wf, probs)
    member = jnp.minimum(chosen.sum(axis=1), 1)  # [N, E] 0/1: e among the chosen
    coact = jnp.einsum("ni,nj->ij", member * w[:, None], member)
    plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
    entropy = -jnp.sum(wf * plogp.sum(axis=-1))
    k = experts.shape[-1]
    distinct = member.sum(axis=-1) == k  # [N]
    in_range = jnp.all((gates > 0) & (gates <= 1), axis=-1)  # NaN fails both comparisons
    sum_ok = jnp.sum(gates, axis=-1) <= 1 + GATE_SUM_SLACK
    bad = jnp.stack([~distinct, ~in_range, ~sum_ok], axis=-1).astype(jnp.int32)  # [N, 3]
    return RouterStats(
        jnp.sum(w),
        counts,
        gate_mass,
        prob_mass,
        coact,
        entropy,
        jnp.einsum("n,nc->c", w, bad),
    )


def _expert_ffn(
    x: jax.Array, w: QuantizedWeight8bit, v: QuantizedWeight8bit, w1: QuantizedWeight8bit
) -> jax.Array:
    """One expert on rows x [M, D] -> [M, D] f32, with the reference's rounding points (weights:
    exact int8 values, grokctl/model/quant.py)."""
    hw = bf16_dot(x, w).astype(F32)  # [M, F]
    hv = bf16_dot(x, v).astype(F32)
    hidden = jax.nn.gelu(hw) * hv  # f32
    return qmatmul(hidden, w1)  # f32 hidden x exact weight values, f32 accumulation


def _combine(outs: jax.Array, gates: jax.Array) -> jax.Array:
    """outs [N, k, D] f32, gates [N, k] -> [N, D] bf16 (gates rounded to bf16 as the reference)."""
    g = round_bf16(gates)[..., None]
    return jnp.sum(outs * g, axis=1).astype(BF16)


def moe_dense(x, gates, experts, w, v, w1) -> jax.Array:  # type: ignore[no-untyped-def]
    """Reference baseline: all E experts on all N tokens, then pick the chosen k."""
    e_count = w.shape[0]
    hw = qeinsum("nd,edf->enf", x, w).astype(BF16)
    hv = qeinsum("nd,edf->enf", x, v).astype(BF16)
    hidden = jax.nn.gelu(hw.astype(F32)) * hv.astype(F32)
    all_out = qeinsum("enf,efd->end", hidden, w1)  # [E, N, D]
    onehot = jax.nn.one_hot(experts, e_count, dtype=F32)  # [N, k, E]
    outs = jnp.einsum("nke,end->nkd", onehot, all_out)
    return _combine(outs, gates)


def block_size(n_tokens: int, k: int, n_experts: int) -> int:
    """Rows per dispatch block: N for small batches (each used expert read once), else about
    N*k/E rounded to a power of two, capped for memory."""
    if n_tokens * k <= 2 * n_experts or n_tokens <= 16:
        return n_tokens
    return min(512, 1 << math.ceil(math.log2(max(1, n_tokens * k // n_experts))))


def moe_rows(x, gates, experts, w, v, w1, live=None) -> jax.Array:  # type: ignore[no-untyped-def]
    """Few assignments (decode, native CPU kernels): every (token, expert) pair is one row of a
    single kernel call per matrix (the gate and up projections share one), which reads each
    chosen expert once. The same rounding points and per-row sums as `_expert_ffn` on each
    expert. `live` [N] bool: tokens to compute (the kernel skips the others' rows, id -1, and
    gives them zeros)."""
    n, d = x.shape
    k = experts.shape[1]
    idx = (experts if live is None else jnp.where(live[:, None], experts, -1)).reshape(n * k)
    rows = jnp.repeat(x.astype(BF16), k, axis=0)  # [N*k, D], token-major like experts
    hw, hv = (round_bf16(h) for h in qmatmul_rows2(rows, w, v, idx))
    hidden = jax.nn.gelu(hw) * hv
    out = qmatmul_rows(hidden, w1, idx)  # [N*k, D] f32
    return _combine(out.reshape(n, k, d), gates)


def moe_sparse(x, gates, experts, w, v, w1, block: int | None = None, live=None) -> jax.Array:  # type: ignore[no-untyped-def]
    """Sorted block dispatch: only chosen experts' weights are read and multiplied (few
    assignments with the native CPU kernels: `moe_rows`). `live` [N] bool: tokens to compute
    (a prompt's padding past its length is not: its assignments sort after every expert's,
    into no block, and its outputs are zeros)."""
    n, d = x.shape
    k = experts.shape[1]
    if block is None and rows_kernel_ok(n * k, w, v, w1):
        return moe_rows(x, gates, experts, w, v, w1, live)
    e_count = w.shape[0]
    b = block or block_size(n, k, e_count)
    a = n * k  # assignments
    flat_e = experts.reshape(a)
    if live is not None:  # skipped assignments: expert e_count, past every run
        flat_e = jnp.where(jnp.repeat(live, k), flat_e, e_count)
    order = jnp.argsort(flat_e, stable=True)  # assignment ids sorted by expert
    sorted_e = flat_e[order]
    counts = jnp.bincount(flat_e, length=e_count)  # [E] (the skipped not counted)
    padded = (counts + b - 1) // b * b
    pad_end = jnp.cumsum(padded)
    pad_start = pad_end - padded
    run_start = jnp.cumsum(counts) - counts
    n_blocks = min(e_count * math.ceil(n / b), math.ceil((a + e_count * (b - 1)) / b))
    p = n_blocks * b
    se = jnp.minimum(sorted_e, e_count - 1)
    slot = pad_start[se] + (jnp.arange(a) - run_start[se])  # [A] slot of each
    slot = jnp.where(sorted_e < e_count, slot, p)  # the skipped: no slot
    slot_token = (
        jnp.full((p,), n, jnp.int32).at[slot].set((order // k).astype(jnp.int32), mode="drop")
    )
    block_expert = jnp.minimum(
        jnp.searchsorted(pad_end, jnp.arange(n_blocks) * b, side="right"), e_count - 1
    )
    used_blocks = pad_end[-1] // b
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)  # row n = padding

    def step(_: None, i: jax.Array) -> tuple[None, jax.Array]:
        def compute() -> jax.Array:
            rows = jax.lax.dynamic_slice_in_dim(slot_token, i * b, b)
            e = block_expert[i]
            return _expert_ffn(
                x_pad[rows], take_expert(w, e), take_expert(v, e), take_expert(w1, e)
            )

        out = jax.lax.cond(i < used_blocks, compute, lambda: jnp.zeros((b, d), F32))
        return None, out

    _, outs = jax.lax.scan(step, None, jnp.arange(n_blocks))  # [n_blocks, b, D]
    outs = jnp.take(outs.reshape(p, d), slot, axis=0, mode="fill", fill_value=0)  # [A, D] sorted
    per_assignment = jnp.zeros((a, d), F32).at[order].set(outs)
    return _combine(per_assignment.reshape(n, k, d), gates)


def moe_layer(
    x: jax.Array, cfg: ModelConfig, kernel: str, live: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`router/w` [D, E] f32 and `moe/{linear, linear_v, linear_1}/w` int8 [E, D, F] / [E, F, D].

    x [B, T, D] -> (out [B, T, D] bf16, router probs [B, T, E] f32, gates [B, T, k] f32,
    experts [B, T, k] int32). `live` [B, T] bool: the positions whose output is used (the sparse
    kernel computes no expert for the others, a prompt's padding, and gives them zeros; every
    token is routed all the same).
    """
    if kernel not in MOE_KERNELS:
        raise ValueError(f"unknown MoE kernel {kernel!r}")
    bsz, t, d = x.shape
    e, f, k = cfg.num_experts, cfg.ffn_size, cfg.num_selected_experts
    router_w = scoped_param("router", "w", (d, e))
    with hk.experimental.name_scope("moe"):
        w = scoped_param("linear", "w", (e, d, f))
        w1 = scoped_param("linear_1", "w", (e, f, d))
        v = scoped_param("linear_v", "w", (e, d, f))
    xs = x.reshape(bsz * t, d)
    probs, gates, experts = route(xs, router_w, k)
    if kernel == "sparse":
        out = moe_sparse(
            xs, gates, experts, w, v, w1, live=None if live is None else live.reshape(-1)
        )
    else:
        out = moe_dense(xs, gates, experts, w, v, w1)
    return (
        out.reshape(bsz, t, d),
        probs.reshape(bsz, t, e),
        gates.reshape(bsz, t, k),
        experts.reshape(bsz, t, k),
    )
