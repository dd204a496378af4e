"""Platform attention kernels behind the attention seam (`transformer.paged_attention`), and the KV pool
layout each reads.

`ModelConfig.attention` names the implementation, a serving choice made by `choose` for the backend:

  "plain"       the jnp scan over pages in transformer.py, on any backend, over `KVCache`
  "tpu_kernel"  jaxserve's Pallas TPU kernel (jaxserve.kernels.paged_attention), one call per layer for
                the step's rows, over `KernelKVCache`; compiled by Mosaic on a TPU, run in TPU interpret
                mode elsewhere (only tests do that: it checks results, not speed)

The KV write stays a plain XLA scatter before the kernel: a step writes at most B * T positions, a small
update in place in the donated pool, and keeping it out of the kernel keeps the kernel read-only (one
layout contract, not two) and the write shared with the plain path (`kv_cache.write_targets`).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxserve.kernels import paged_attention as tpu
from jaxserve.model.config import ModelConfig
from jaxserve.model.kv_cache import KVCache, write_targets

log = logging.getLogger(__name__)

ATTENTIONS = ("plain", "tpu_kernel")


@struct.dataclass
class KernelKVCache:
    """The pool in the TPU kernel's layout: kv [L, P, K, 2, S, H], a page holding each KV head's keys and
    values as [S, H] tiles (positions on sublanes, head dim on lanes), so that one DMA per (page, head)
    brings both. Same contract as KVCache (see kv_cache.py): tables, dropped writes, stale entries hidden
    by the causal mask."""

    kv: jax.Array  # [L, P, K, 2, S, H]

    @classmethod
    def shape_dtype(cls, cfg: ModelConfig, pages: int, page_size: int) -> KernelKVCache:
        shape = (cfg.n_layers, pages, cfg.n_kv_heads, 2, page_size, cfg.head_dim)
        return cls(kv=jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.dtype)))

    @classmethod
    def zeros(cls, cfg: ModelConfig, pages: int, page_size: int) -> KernelKVCache:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cls.shape_dtype(cfg, pages, page_size))

    @classmethod
    def per_row(cls, cfg: ModelConfig, rows: int, length: int) -> tuple[KernelKVCache, np.ndarray]:
        return cls.zeros(cfg, rows, length), np.arange(rows, dtype=np.int32)[:, None]

    @staticmethod
    def axes() -> KernelKVCache:
        return KernelKVCache(kv=("layers", None, "kv_heads", None, None, "head_dim"))

    @property
    def pages(self) -> int:
        return self.kv.shape[1]

    @property
    def page_size(self) -> int:
        return self.kv.shape[4]

    def write(self, layer, table, positions, k, v, write_from=None) -> KernelKVCache:
        page, offset = write_targets(table, positions, write_from, self.pages, self.page_size)
        # advanced indices around slices: the indexed dims [b, T] come first, then K, 2, H
        kv = jnp.stack([k, v], axis=-2).astype(self.kv.dtype)
        return KernelKVCache(kv=self.kv.at[layer, page, :, :, offset].set(kv, mode="drop"))

    def copy_page(self, src, dst) -> KernelKVCache:
        return KernelKVCache(kv=self.kv.at[:, dst].set(self.kv[:, src]))


def kv_cache_for(cfg: ModelConfig) -> type[KVCache] | type[KernelKVCache]:
    """The pool's class for cfg.attention."""
    return KernelKVCache if cfg.attention == "tpu_kernel" else KVCache


def attend(c: ModelConfig, q, cache: KernelKVCache, layer, table, positions, window: int, local):
    """transformer.paged_attention by the TPU kernel: same arguments, same result."""
    B, T, N, H = q.shape
    K, P = c.n_kv_heads, cache.pages
    table = jnp.asarray(table)[:, : window // cache.page_size]
    table = jnp.where(table < P, table, 0)  # "no page": keys no real query sees; the DMA must stay in the pool
    lens = positions[:, -1] + 1  # a row's positions are consecutive (a prefill chunk, or one decode token)
    sliding = jnp.where(local, c.sliding_window or tpu.NO_WINDOW, tpu.NO_WINDOW)
    out = tpu.paged_attention(
        q.reshape(B, T, K, N // K, H),
        cache.kv,
        layer,
        sliding,
        lens,
        table,
        scale=c.attention_scale,
        interpret=jax.default_backend() != "tpu",
    )
    return out.reshape(B, T, N, H).astype(jnp.dtype(c.dtype))


def choose(cfg: ModelConfig, mesh: jax.sharding.Mesh, page_size: int, backend: str | None = None) -> ModelConfig:
    """`cfg` with the attention to serve with on `backend` (default: jax's), logged: the TPU kernel on a
    TPU where it takes the shapes, else the plain path (named with the reason on a TPU)."""
    backend = backend or jax.default_backend()
    if backend != "tpu":
        log.info("attention: plain (XLA) on %s", backend)
        return dataclasses.replace(cfg, attention="plain")
    refused = []
    if page_size % tpu.PAGE_MULTIPLE:
        refused.append(f"page size {page_size} is not a multiple of {tpu.PAGE_MULTIPLE}")
    if mesh.size > 1:  # a pallas_call is not partitioned by XLA: it would gather the whole pool to each chip
        refused.append(f"a mesh of {mesh.size} devices (the kernel is not yet mapped over it with shard_map)")
    if refused:
        log.warning("attention: plain (XLA), not the TPU kernel: %s", "; ".join(refused))
        return dataclasses.replace(cfg, attention="plain")
    log.info("attention: jaxserve's Pallas TPU kernel (pages of %d positions)", page_size)
    return dataclasses.replace(cfg, attention="tpu_kernel")
