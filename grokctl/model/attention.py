"""Grouped-query attention with rotary embeddings, soft-capped logits and a KV cache.

Shapes: B batch, T new tokens, S cache length, H q heads, G kv heads, R = H/G, K key_size.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from grokctl.config import ModelConfig
from grokctl.model.layers import BF16, F32, linear, linears

MASKED = -1e30  # the reference's mask value (not -inf: a fully masked row goes uniform)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate-half RoPE: x [B, T, N, K], positions [B, T] -> same dtype as x."""
    k = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, k, 2, dtype=F32) / k))  # [K/2]
    phase = positions.astype(F32)[..., None] * inv_freq  # [B, T, K/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [B, S, G, K] <- new [B, T, G, K] at row offsets start [B]."""
    update = lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0)  # noqa: E731
    return jax.vmap(update)(cache, new.astype(cache.dtype), start)


def attention(
    x: jax.Array,  # [B, T, D] bf16
    positions: jax.Array,  # [B, T] absolute positions of the new tokens
    k_cache: jax.Array,  # [B, S, G, K]
    v_cache: jax.Array,  # [B, S, G, K]
    start: jax.Array,  # [B] where the new tokens are written
    key_valid: jax.Array,  # [B, S] bool: a real (non-pad) token sits there (after writing)
    cfg: ModelConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`multi_head_attention/{query,key,value,linear}/w`; returns (out [B,T,D], k, v cache)."""
    b, t, d = x.shape
    h, g, k = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
    with hk.experimental.name_scope("multi_head_attention"):
        q, kk, vv = linears(x, [("query", d, h * k), ("key", d, g * k), ("value", d, g * k)])
        q = q.reshape(b, t, h, k)
        kk = kk.reshape(b, t, g, k)
        vv = vv.reshape(b, t, g, k)
        q = rope(q, positions, cfg.rope_base)
        kk = rope(kk, positions, cfg.rope_base)

        k_cache = write_cache(k_cache, kk, start)
        v_cache = write_cache(v_cache, vv, start)
        s = k_cache.shape[1]

        q = q.reshape(b, t, g, h // g, k)  # q head i reads kv head i // (H/G)
        logits = jnp.einsum("btgrk,bsgk->bgrts", q, k_cache, preferred_element_type=F32)
        logits = logits.astype(BF16).astype(F32) * cfg.attn_output_multiplier  # [B,G,R,T,S]
        cap = cfg.attn_logit_softcap
        logits = cap * jnp.tanh(logits / cap)
        causal = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, T, S]
        mask = (causal & key_valid[:, None, :])[:, None, None, :, :]
        logits = jnp.where(mask, logits, MASKED)
        weights = jax.nn.softmax(logits, axis=-1).astype(BF16)
        attn = jnp.einsum("bgrts,bsgk->btgrk", weights, v_cache, preferred_element_type=F32)
        attn = attn.astype(BF16).reshape(b, t, h * k)
        return linear(attn, "linear", h * k, d), k_cache, v_cache
