"""The KV cache: a pytree of two arrays per layer stack, k [L, B, K, H, S] and v [L, B, K, S, H] (layers,
slots, KV heads, head dim / positions).

Each layout is the one its attention matmul reads without repacking: scores = q [G, H] x k [H, W] and
out = p [G, W] x v [W, H], both with the contracted dim leading on the cache side. (With k stored
[S, H], XLA:CPU's q . k^T took several times longer than the same FLOPs of p . v.)

Slot b's entry at position p belongs to whichever sequence last wrote it; attention masks by position
(key position <= query position), so a reused slot needs no clearing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxserve.model.config import ModelConfig

SEQ_AXIS = {"k": 4, "v": 3}  # where the positions sit in each array


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, H, S]
    v: jax.Array  # [L, B, K, S, H]

    @classmethod
    def shape_dtype(cls, cfg: ModelConfig, slots: int, length: int) -> KVCache:
        L, K, H, dt = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
        return cls(
            k=jax.ShapeDtypeStruct((L, slots, K, H, length), dt), v=jax.ShapeDtypeStruct((L, slots, K, length, H), dt)
        )

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, length: int) -> KVCache:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cls.shape_dtype(cfg, slots, length))

    @staticmethod
    def axes() -> KVCache:
        """Logical axis names of each array, for jaxserve.sharding."""
        return KVCache(
            k=("layers", "batch", "kv_heads", "head_dim", "cache_seq"),
            v=("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
        )

    @property
    def length(self) -> int:
        return self.v.shape[SEQ_AXIS["v"]]

    def write(self, layer, positions, k, v, slots=None) -> KVCache:
        """Write k, v [b, T, K, H] at (layer, slots[i], positions[i, t]); positions past the end are dropped.

        `slots` [b] names the cache rows of the b sequences; None means all B rows in order."""
        rows = (jnp.arange(k.shape[0]) if slots is None else slots)[:, None]
        # advanced indices around slices: the indexed dims [b, T] come first, then K, H — k's own layout
        return KVCache(
            k=self.k.at[layer, rows, :, :, positions].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[layer, rows, :, positions].set(v.astype(self.v.dtype), mode="drop"),
        )

    def read(self, layer, window: int, slots=None, rows: int | None = None):
        """The first `window` positions of one layer for `slots`, or (slots None) for the first `rows`
        cache rows (None: all): k [b, K, H, W], v [b, K, W, H]."""
        if slots is not None:  # out-of-range slots (padding rows) read a clipped row, never used
            return (
                self.k.at[layer, slots, :, :, :window].get(mode="clip"),
                self.v.at[layer, slots, :, :window].get(mode="clip"),
            )
        _, B, K, _, H = self.v.shape
        B = B if rows is None else rows
        start = (layer, 0, 0, 0, 0)
        k = jax.lax.dynamic_slice(self.k, start, (1, B, K, H, window))[0]
        v = jax.lax.dynamic_slice(self.v, start, (1, B, K, window, H))[0]
        return k, v

    def copy_slot(self, src, dst, window: int) -> KVCache:
        """Copy slot src's first `window` positions (every layer) into slot dst."""

        def copy(a, seq_axis):
            rows = jax.lax.dynamic_slice_in_dim(a, src, 1, axis=1)
            rows = jax.lax.slice_in_dim(rows, 0, window, axis=seq_axis)
            return jax.lax.dynamic_update_slice_in_dim(a, rows, dst, axis=1)

        return KVCache(k=copy(self.k, SEQ_AXIS["k"]), v=copy(self.v, SEQ_AXIS["v"]))
