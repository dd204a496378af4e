"""The KV cache: a pytree of two arrays [L, B, K, S, H] (layers, slots, KV heads, positions, head dim).

Positions sit next to the head dim so one (slot, KV head)'s window is contiguous: attention reads it as
one batched matmul operand with no transpose.

Slot b's entry at position p belongs to whichever sequence last wrote it; attention masks by position
(key position <= query position), so a reused slot needs no clearing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxserve.model.config import ModelConfig

# Logical axis names of each cache array, for jaxserve.sharding.
CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array

    @classmethod
    def shape_dtype(cls, cfg: ModelConfig, slots: int, length: int) -> "KVCache":
        s = jax.ShapeDtypeStruct((cfg.n_layers, slots, cfg.n_kv_heads, length, cfg.head_dim), jnp.dtype(cfg.dtype))
        return cls(k=s, v=s)

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, length: int) -> "KVCache":
        s = cls.shape_dtype(cfg, slots, length).k
        return cls(k=jnp.zeros(s.shape, s.dtype), v=jnp.zeros(s.shape, s.dtype))

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def write(self, layer, positions, k, v, slots=None) -> "KVCache":
        """Write k, v [b, T, K, H] at (layer, slots[i], positions[i, t]); positions past the end are dropped.

        `slots` [b] names the cache rows of the b sequences; None means all B rows in order."""
        rows = (jnp.arange(k.shape[0]) if slots is None else slots)[:, None]
        # advanced indices around a slice: the indexed dims [b, T] come first, then K, H — k's own layout
        return KVCache(k=self.k.at[layer, rows, :, positions].set(k.astype(self.k.dtype), mode="drop"),
                       v=self.v.at[layer, rows, :, positions].set(v.astype(self.v.dtype), mode="drop"))

    def read(self, layer, window: int, slots=None, rows: int | None = None):
        """The first `window` positions of one layer for `slots`, or (slots None) for the first `rows`
        cache rows (None: all): k, v [b, K, W, H]."""
        if slots is not None:  # out-of-range slots (padding rows) read a clipped row, never used
            return (self.k.at[layer, slots, :, :window].get(mode="clip"),
                    self.v.at[layer, slots, :, :window].get(mode="clip"))
        _, B, K, _, H = self.k.shape
        B = B if rows is None else rows
        start = (layer, 0, 0, 0, 0)
        k = jax.lax.dynamic_slice(self.k, start, (1, B, K, window, H))[0]
        v = jax.lax.dynamic_slice(self.v, start, (1, B, K, window, H))[0]
        return k, v
