"""Flax (linen) Llama-family transformer that reads and writes a KV cache.

One forward serves every use: a prefill of T tokens per sequence or a decode of one token per sequence.
Each token carries its absolute position; its K/V are written into the cache at that position first, then
every query attends over the cache window [0, W) with keys at positions <= its own. Stale entries from a
slot's previous occupant always sit at later positions, so the causal mask hides them without a reset.
Layers run under `nn.scan` (compile time does not grow with depth) with the whole cache in the carry so
the step updates it in place. Every parameter carries logical axis names (see jaxserve.sharding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxserve.model.config import ModelConfig
from jaxserve.model.kv_cache import KVCache


def _param(module: nn.Module, name: str, shape, axes, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones, self.dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float):
    """cos/sin [B, T, H] for rotate-half RoPE (HF layout; GGUF's pairwise layout is undone on import)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [B, T, heads, H]; cos/sin [B, T, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class Block(nn.Module):
    """One decoder layer; scanned over layers with carry (x, cache, layer index)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, positions, cos, sin, slots, window: int):
        x, cache, layer = carry
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        B, T, _ = x.shape
        init = nn.initializers.normal(stddev=0.02)

        h = RMSNorm(c.norm_eps, dt, name="attn_norm")(x)
        wq = _param(self, "q", (c.dim, c.n_heads, c.head_dim), ("embed", "q_heads", "head_dim"), init, dt)
        wk = _param(self, "k", (c.dim, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), init, dt)
        wv = _param(self, "v", (c.dim, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), init, dt)
        wo = _param(self, "o", (c.n_heads, c.head_dim, c.dim), ("q_heads", "head_dim", "embed"), init, dt)
        q = apply_rope(jnp.einsum("btd,dnh->btnh", h, wq), cos, sin)
        k = apply_rope(jnp.einsum("btd,dkh->btkh", h, wk), cos, sin)
        v = jnp.einsum("btd,dkh->btkh", h, wv)

        cache = cache.write(layer, positions, k, v, slots)
        keys, values = cache.read(layer, window, slots, rows=B)  # [B, K, W, H]

        # GQA without repeating K/V: the G query heads of each KV head and the T tokens form the rows of
        # one [G*T, H] x [H, W] matmul per (slot, KV head). Query head n = k * G + g, as in HF's repeat_kv.
        G = c.n_heads // c.n_kv_heads
        q = q.reshape(B, T, c.n_kv_heads, G, c.head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
        q = q.reshape(B, c.n_kv_heads, G * T, c.head_dim)
        scores = jnp.einsum("bkrh,bksh->bkrs", q, keys).astype(jnp.float32) * c.head_dim**-0.5
        scores = scores.reshape(B, c.n_kv_heads, G, T, window)
        mask = jnp.arange(window)[None, None, :] <= positions[:, :, None]  # [B, T, W]
        scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(B, c.n_kv_heads, G * T, window)
        attn = jnp.einsum("bkrs,bksh->bkrh", probs, values).reshape(B, c.n_kv_heads, G, T, c.head_dim)
        attn = attn.transpose(0, 3, 1, 2, 4).reshape(B, T, c.n_heads, c.head_dim)
        x = x + jnp.einsum("btnh,nhd->btd", attn, wo)

        h = RMSNorm(c.norm_eps, dt, name="mlp_norm")(x)
        wg = _param(self, "gate", (c.dim, c.mlp_dim), ("embed", "mlp"), init, dt)
        wu = _param(self, "up", (c.dim, c.mlp_dim), ("embed", "mlp"), init, dt)
        wd = _param(self, "down", (c.mlp_dim, c.dim), ("mlp", "embed"), init, dt)
        x = x + (nn.silu(h @ wg) * (h @ wu)) @ wd
        return (x, cache, layer + 1), None


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, cache: KVCache, window: int, slots=None):
        """tokens, positions [B, T] int32 -> (logits [B, T, V] float32, updated cache).

        `window` (static) must exceed every position in `positions`; attention reads only cache[:, :window].
        `slots` [B] maps each row to a cache row (a prefill into one slot); None: row b is cache row b (the
        first B rows of a cache that may hold more).
        """
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        embed = nn.Embed(c.vocab_size, c.dim, dtype=dt, param_dtype=dt, name="embed",
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")))
        x = embed(tokens)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,) * 5,
                         length=c.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        (x, cache, _), _ = layers(c, name="layers")((x, cache, jnp.int32(0)), positions, cos, sin, slots,
                                                             window)
        x = RMSNorm(c.norm_eps, dt, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            head = _param(self, "lm_head", (c.dim, c.vocab_size), ("embed", "vocab"),
                          nn.initializers.normal(0.02), dt)
            logits = x @ head
        return logits.astype(jnp.float32), cache
