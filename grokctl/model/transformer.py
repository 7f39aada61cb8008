"""The Grok-1 forward pass over a params pytree and a KV cache (haiku lives only in model/).

Shapes: B batch, T new tokens, S cache length, D emb_size, V vocab, L layers, E experts.

    h = embed(tokens) * embedding_multiplier                     # bf16 [B, T, D]
    for each layer:
        h += rms_norm_1(attention(rms_norm(h)))
        h += rms_norm_3(moe(rms_norm_2(h)))
    logits = rms_norm(h) . embeddings^T * output_multiplier      # bf16 [B, T, V]

The tied embedding table is f32 (the release), bf16 (exact: the reference computes with it in
bf16) or int8 per row (native checkpoints: weight int8 [V, D] x scales bf16 [V, 1]).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from grokctl.config import ModelConfig, default
from grokctl.model.attention import attention
from grokctl.model.cache import KVCache
from grokctl.model.layers import BF16, param, rms_norm, rms_norm_apply
from grokctl.model.moe import RouterStats, moe_layer, router_stats
from grokctl.model.quant import BF16_BITS, QuantizedWeight, from_bits
from grokctl.model.quant import unembed as unembed_table


class ForwardOut(NamedTuple):
    logits: jax.Array  # [B, T', V] bf16 (T' = T, or 1 with `last_index`)
    cache: KVCache
    router_probs: jax.Array | None  # [L, B, T, E] f32 when asked for
    experts: jax.Array | None  # [L, B, T, k] int32 when asked for
    routing: RouterStats | None = None  # [L, ...] sums over the counted tokens, when asked for


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    moe_kernel: str = default("moe")
    with_routing: bool = False  # return every token's router probs and experts
    routing_stats: bool = False  # return RouterStats over the tokens `count` marks


def forward(
    tokens: jax.Array,  # [B, T] int32
    cache: KVCache,
    last_index: jax.Array | None,  # [B] index into T of the only logits wanted, or None (all)
    cfg: ModelConfig,
    opts: ForwardOptions,
    count: jax.Array | None = None,  # [B, T] bool: tokens routing statistics count
    live: jax.Array | None = None,  # [B, T] bool: positions whose outputs are used (else all)
) -> ForwardOut:
    b, t = tokens.shape
    start = cache.pos  # [B]
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    is_token = tokens > cfg.pad_token  # the reference's input mask
    write = lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0)  # noqa: E731
    key_valid = jax.vmap(write)(cache.valid, is_token, start)  # [B, S]

    with hk.experimental.name_scope("language_model"):
        with hk.experimental.name_scope("in_out_embed"):
            embeddings = param("embeddings", (cfg.vocab_size, cfg.emb_size))
        with hk.experimental.name_scope("rms_norm"):
            final_scale = param("scale", (cfg.emb_size,))

    h = embed(embeddings, tokens)  # [B, T, D] bf16
    h = h * jnp.asarray(cfg.embedding_multiplier_scale, BF16)

    eps = cfg.rms_norm_eps
    new_k, new_v, probs, experts, stats = [], [], [], [], []
    with hk.experimental.name_scope("transformer"):
        for i in range(cfg.num_layers):
            with hk.experimental.name_scope(f"decoder_layer_{i}"):
                a, k_i, v_i = attention(
                    rms_norm(h, "rms_norm", eps),
                    positions,
                    cache.k[i],
                    cache.v[i],
                    start,
                    key_valid,
                    cfg,
                )
                h = h + rms_norm(a, "rms_norm_1", eps)
                m, p_i, g_i, e_i = moe_layer(
                    rms_norm(h, "rms_norm_2", eps), cfg, opts.moe_kernel, live
                )
                h = h + rms_norm(m, "rms_norm_3", eps)
            new_k.append(k_i)
            new_v.append(v_i)
            probs.append(p_i)
            experts.append(e_i)
            if opts.routing_stats:
                mask = is_token if count is None else count & is_token  # pads never count
                n = b * t
                stats.append(
                    router_stats(
                        p_i.reshape(n, -1), g_i.reshape(n, -1), e_i.reshape(n, -1), mask.reshape(n)
                    )
                )

    if last_index is not None:
        h = jnp.take_along_axis(h, last_index[:, None, None], axis=1)  # [B, 1, D]
    h = rms_norm_apply(h, final_scale, eps)
    logits = unembed(h, embeddings) * jnp.asarray(cfg.output_multiplier_scale, BF16)

    new_cache = KVCache(tuple(new_k), tuple(new_v), start + t, key_valid)
    routing = jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else None
    if not opts.with_routing:
        return ForwardOut(logits, new_cache, None, None, routing)
    return ForwardOut(logits, new_cache, jnp.stack(probs), jnp.stack(experts), routing)


def embed(embeddings: Any, tokens: jax.Array) -> jax.Array:
    """Rows of the tied table [V, D] (f32, bf16, bf16 bits, or int8 per row: row * scale) as
    bf16."""
    if isinstance(embeddings, QuantizedWeight):  # weight int8 [V, D], scales [V, 1]
        rows = jnp.take(embeddings.weight, tokens, axis=0).astype(BF16)  # [B, T, D]
        return rows * jnp.take(embeddings.scales, tokens, axis=0).astype(BF16)  # x [B, T, 1]
    if embeddings.dtype == BF16_BITS:  # the engine's bf16 table as bits (quant.bf16_tables)
        return from_bits(jnp.take(embeddings, tokens, axis=0))
    return jnp.take(embeddings, tokens, axis=0).astype(BF16)


def unembed(h: jax.Array, embeddings: Any) -> jax.Array:
    """Logits h . embeddings^T (bf16); an int8-per-row table: (h . W^T) * scales^T."""
    return unembed_table(h, embeddings)  # grokctl.model.quant: the native kernels, else XLA


def transformed(cfg: ModelConfig, opts: ForwardOptions) -> Any:
    """hk.Transformed whose apply(params, tokens, cache, last_index, count=None, live=None) ->
    ForwardOut."""
    fn = lambda tokens, cache, last_index, count=None, live=None: forward(  # noqa: E731
        tokens, cache, last_index, cfg, opts, count, live
    )
    return hk.without_apply_rng(hk.transform(fn))


def param_shapes(cfg: ModelConfig) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """The haiku params tree as plain float shapes (jax.eval_shape: no memory allocated)."""
    from grokctl.model.cache import cache_shapes

    cache = cache_shapes(cfg, 1, 8)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    init = transformed(cfg, ForwardOptions()).init
    return jax.eval_shape(lambda t, c: init(None, t, c, None), tokens, cache)
