"""Grouped-query attention with rotary embeddings, soft-capped logits and a KV cache.

Shapes: B batch, T new tokens, S cache length (the cache is [B, G, S, K]: each kv head's keys
contiguous, so the attention dots read it in place), H q heads, G kv heads, R = H/G, K key_size.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from grokctl.config import ModelConfig
from grokctl.model.layers import BF16, F32, linear, linears, round_bf16
from grokctl.model.quant import from_bits, kernels_active, to_bits

MASKED = -1e30  # the reference's mask value (not -inf: a fully masked row goes uniform)
# Up to this many new tokens (decode, speculative steps) the native CPU kernel computes the
# attention where it applies: it reads the cache in place up to the last visible position,
# where XLA:CPU converts and transposes the whole cache to f32 in every layer.
KERNEL_MAX_TOKENS = 8


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
    """cache [B, G, S, K] (bf16 bits) <- new [B, T, G, K] at positions start [B] + 0..T-1."""
    update = lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=1)  # noqa: E731
    return jax.vmap(update)(cache, to_bits(new).transpose(0, 2, 1, 3), start)


def attention(
    x: jax.Array,  # [B, T, D] bf16
    positions: jax.Array,  # [B, T] absolute positions of the new tokens
    k_cache: jax.Array,  # [B, G, S, K] bf16 bits
    v_cache: jax.Array,  # [B, G, S, K] bf16 bits
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
        attn = attend(q, k_cache, v_cache, positions, key_valid, cfg)
        return linear(attn.astype(BF16).reshape(b, t, h * k), "linear", h * k, d), k_cache, v_cache


def attend(
    q: jax.Array,  # [B, T, H, K] bf16, rotated
    k_cache: jax.Array,  # [B, G, S, K] bf16 bits, this step's keys written
    v_cache: jax.Array,  # [B, G, S, K] bf16 bits
    positions: jax.Array,  # [B, T]
    key_valid: jax.Array,  # [B, S] bool
    cfg: ModelConfig,
) -> jax.Array:
    """softmax(softcap(q . k)) . v -> f32 [B, T, H, K]: the native kernel for a few new tokens
    on one CPU device, else `attend_xla` (same rounding points, f32 sums in another order)."""
    mult, cap = cfg.attn_output_multiplier, cfg.attn_logit_softcap
    if q.shape[1] <= KERNEL_MAX_TOKENS and kernels_active():
        from grokctl import kernels

        return kernels.attend(q, k_cache, v_cache, positions, key_valid, mult, cap)
    return attend_xla(q, k_cache, v_cache, positions, key_valid, mult, cap)


def attend_xla(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    key_valid: jax.Array,
    multiplier: float,
    cap: float,
) -> jax.Array:
    """The reference's attention in XLA ops (shapes as `attend`)."""
    b, t, h, k = q.shape
    g, s = k_cache.shape[1], k_cache.shape[2]
    q = q.reshape(b, t, g, h // g, k)  # q head i reads kv head i // (H/G)
    keys, values = from_bits(k_cache), from_bits(v_cache)
    if jax.default_backend() == "cpu":
        q, keys = q.astype(F32), keys.astype(F32)
    logits = jnp.einsum("btgrk,bgsk->bgrts", q, keys, preferred_element_type=F32)
    logits = round_bf16(logits) * multiplier  # [B,G,R,T,S]
    logits = cap * jnp.tanh(logits / cap)
    causal = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    mask = (causal & key_valid[:, None, :])[:, None, None, :, :]
    logits = jnp.where(mask, logits, MASKED)
    weights = jax.nn.softmax(logits, axis=-1)
    if jax.default_backend() == "cpu":
        # the same products in f32 (bf16 values are exact in f32): XLA:CPU has no bf16 batched
        # dot for this form ("Unsupported element type for DotThunk"), where it would convert
        weights, values = round_bf16(weights), values.astype(F32)
    else:
        weights = weights.astype(BF16)
    attn = jnp.einsum("bgrts,bgsk->btgrk", weights, values, preferred_element_type=F32)
    return attn.reshape(b, t, h, k)
