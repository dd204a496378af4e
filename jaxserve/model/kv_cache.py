"""The KV cache as a pool of fixed-size pages shared by every sequence: k [L, P, K, H, S] and
v [L, P, K, S, H] (layers, pages, KV heads, head dim / positions within a page).

A sequence owns a page table: row b of `table` [B, pages per sequence] names the page holding its positions
[i * S, (i + 1) * S) in column i; an entry past the pool (P) is no page: writes there are dropped and reads
return some page's data (the last page's), which the causal mask hides. Attention reads a sequence's window
page by page, each page in the layout its two matmuls read without repacking (scores = q [G, H] x k [H, S],
out = p [G, S] x v [S, H]): the plain path gathers one page per row at a time (`read`), the CPU kernel
(jaxserve/kernels/attention.cc) reads the pages where they lie in these arrays, so this layout is its
contract too.

A page's entries past the positions its sequence has written belong to an earlier owner; attention masks
by position (key position <= query position), so a reused page needs no clearing.

The pages hold `cfg.cache_dtype` (every layout declares its arrays from it): writes round k and v to it,
and attention upcasts what it reads to the wider of it and the activations' dtype. This pool keeps a
bfloat16 cache as its bits (uint16, `STORED`): XLA:CPU gathers from and scatters into a bfloat16 array by
converting the whole array to float32 and back, a cost per layer and step that grows with the pool, where
on 16-bit integers both stay the few rows they touch. `write` and `read` reinterpret at the rows; the CPU
kernel widens the bits itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxserve.model.config import ModelConfig


def write_targets(table, positions, write_from, pages: int, page_size: int):
    """(page, offset within it) [b, T] where each token at `positions` [b, T] goes, by its row's table
    [b, pages per sequence]; page `pages` (none: the write is dropped) for positions without a page and
    for those before `write_from` [b] (None: all written), which are in pages shared with other sequences."""
    column = positions // page_size
    page = jnp.take_along_axis(table, jnp.minimum(column, table.shape[1] - 1), axis=1)
    page = jnp.where(column < table.shape[1], page, pages)
    if write_from is not None:
        page = jnp.where(positions < write_from[:, None], pages, page)
    return page, positions % page_size


STORED = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16)}  # a dtype this pool holds as bits of the same width
AS_STORED = {stored: dtype for dtype, stored in STORED.items()}


def stored_dtype(dtype) -> jnp.dtype:
    """The dtype of the arrays holding a `dtype` cache."""
    return STORED.get(jnp.dtype(dtype), jnp.dtype(dtype))


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, P, K, H, S]
    v: jax.Array  # [L, P, K, S, H]

    @classmethod
    def shape_dtype(cls, cfg: ModelConfig, pages: int, page_size: int) -> KVCache:
        L, K, H, dt = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, stored_dtype(cfg.cache_dtype)
        return cls(
            k=jax.ShapeDtypeStruct((L, pages, K, H, page_size), dt),
            v=jax.ShapeDtypeStruct((L, pages, K, page_size, H), dt),
        )

    @classmethod
    def zeros(cls, cfg: ModelConfig, pages: int, page_size: int) -> KVCache:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cls.shape_dtype(cfg, pages, page_size))

    @classmethod
    def per_row(cls, cfg: ModelConfig, rows: int, length: int) -> tuple[KVCache, np.ndarray]:
        """An empty cache of one `length`-position page per row, and its table [rows, 1] (a whole forward
        pass outside the engine: training, tests)."""
        return cls.zeros(cfg, rows, length), np.arange(rows, dtype=np.int32)[:, None]

    @staticmethod
    def bytes_per_token(cfg: ModelConfig) -> int:
        """The pool's bytes per position (K and V of every layer), in cfg.cache_dtype: what sizes the pool."""
        return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.cache_dtype).itemsize

    @classmethod
    def axes(cls) -> KVCache:
        """Logical axis names of each array, for jaxserve.sharding. Pages are not split: any sequence, on
        any data shard, may hold any page."""
        return cls(
            k=("layers", None, "kv_heads", "head_dim", None),
            v=("layers", None, "kv_heads", None, "head_dim"),
        )

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the keys and values held (not of the arrays holding them: see STORED)."""
        return AS_STORED.get(self.k.dtype, self.k.dtype)

    def _stored(self, x):
        """`x` rounded to the pool's dtype, as the arrays hold it."""
        x = x.astype(self.dtype)
        return x if x.dtype == self.k.dtype else jax.lax.bitcast_convert_type(x, self.k.dtype)

    def _loaded(self, x):
        """Entries read from the arrays, as the pool's dtype."""
        return x if x.dtype == self.dtype else jax.lax.bitcast_convert_type(x, self.dtype)

    @property
    def pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[-1]

    def write(self, layer, table, positions, k, v, write_from=None) -> KVCache:
        """Write k, v [b, T, K, H] of row b's tokens at `positions` [b, T] into its pages (`table` [b, ...]).
        Positions before `write_from` [b] are not written (pages shared with other sequences); nor are
        those without a page."""
        page, offset = write_targets(table, positions, write_from, self.pages, self.page_size)
        # advanced indices around slices: the indexed dims [b, T] come first, then K, H — k's own layout
        return self.replace(
            k=self.k.at[layer, page, :, :, offset].set(self._stored(k), mode="drop"),
            v=self.v.at[layer, page, :, offset].set(self._stored(v), mode="drop"),
        )

    def entries(self, page, offset):
        """Every layer's k, v [b, T, L, K, H] at (page, offset) [b, T] (`write_targets`; no page: some
        page's data)."""
        k, v = self.k.at[:, page, :, :, offset].get(mode="fill"), self.v.at[:, page, :, offset].get(mode="fill")
        return self._loaded(k), self._loaded(v)

    def with_entries(self, page, offset, k, v) -> KVCache:
        """Every layer's entries at (page, offset) [b, T] take k, v [b, T, L, K, H] (`entries`' layout);
        no page: dropped."""
        return self.replace(
            k=self.k.at[:, page, :, :, offset].set(self._stored(k), mode="drop"),
            v=self.v.at[:, page, :, offset].set(self._stored(v), mode="drop"),
        )

    def read(self, layer, pages):
        """One page per row from one layer, `pages` [b]: k [b, K, H, S], v [b, K, S, H]."""
        return tuple(self._loaded(x.at[layer, pages].get(mode="clip")) for x in (self.k, self.v))

    def copy_page(self, src, dst) -> KVCache:
        """Page dst takes page src's contents (every layer): copy-on-write of a shared partial page."""
        return self.replace(k=self.k.at[:, dst].set(self.k[:, src]), v=self.v.at[:, dst].set(self.v[:, src]))
