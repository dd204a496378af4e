"""Platform attention kernels behind the attention seam (`transformer.paged_attention`), and the KV pool
layout each reads.

`ModelConfig.attention` names the implementation, a serving choice made by `choose` for the backend:

  "plain"       the jnp scan over pages in transformer.py, on any backend, over `KVCache`
  "cpu_kernel"  jaxserve's C++ kernel for XLA:CPU (jaxserve/kernels/attention.cc, through the XLA FFI), one
                call per layer for the step's rows, prefill chunks and decode rows, global and local
                layers, over `KVCache` itself: it reads each page where it lies in the pool, where the
                plain path gathers a copy of a page per row at each step of its scan, and reads no page
                past a row's last position
  "tpu_kernel"  jaxserve's Pallas TPU kernel (jaxserve.kernels.paged_attention), one call per layer for
                the step's rows, over `TpuKVCache`; compiled by Mosaic on a TPU, run in TPU interpret
                mode elsewhere (only tests do that: it checks results, not speed)
  "gpu_kernel"  jax's Pallas GPU (Triton) paged attention for decode rows of global layers, over
                `GpuKVCache`; prefill chunks and sliding-window layers take the plain path over the same
                pool (the kernel has neither queries at several positions nor a window); run with
                `interpret=True` off a GPU (tests)

jax's GPU kernel serves as it is: it takes one layer's pages [K, pages, S, H], and the pool, held as
[K, L, P, S, H], is that with the layers folded into the pages ([K, L * P, S, H] is the same buffer), so
the layer is chosen by offsetting the page table by layer * P instead of by a copy of the layer. The CPU
kernel takes the whole pool and the layer as an operand for the same reason: an operand sliced out of the
pool inside the layer scan would be a copy of the layer.

Each layout holds `cfg.cache_dtype`. The plain path, the CPU and the TPU kernels upcast the pages they read
and compute in float32; jax's GPU kernel multiplies the probabilities in the pages' dtype, so `choose`
refuses it for a pool narrower than the activations (float32 under a bfloat16 pool) and serves the plain
path. The CPU kernel is not partitioned over a mesh (an FFI call is opaque to XLA's partitioner, which
would gather the whole pool to each device), so a mesh of several devices keeps the plain path there too.

The KV write stays a plain XLA scatter before the kernel: a step writes at most B * T positions, a small
update in place in the donated pool, and keeping it out of the kernel keeps the kernel read-only (one
layout contract, not two) and the write shared with the plain path (`kv_cache.write_targets`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.pallas.ops.gpu import paged_attention as gpu

from jaxserve import kernels
from jaxserve.kernels import paged_attention as tpu
from jaxserve.model.config import ModelConfig
from jaxserve.model.kv_cache import KVCache, write_targets

log = logging.getLogger(__name__)


@struct.dataclass
class CpuKVCache(KVCache):
    """KVCache's pool, for the CPU kernel: written in place by jaxserve's kernel (kernels.kv_write), where
    XLA:CPU's scatter is a loop over the tokens, a fusion each."""

    def write(self, layer, table, positions, k, v, write_from=None) -> CpuKVCache:
        page, offset = write_targets(table, positions, write_from, self.pages, self.page_size)
        k, v = kernels.kv_write(self.k, self.v, layer, page, offset, self._stored(k), self._stored(v))
        return self.replace(k=k, v=v)


@struct.dataclass
class TpuKVCache:
    """The pool in the TPU kernel's layout: kv [L, P, K, 2, S, H], a page holding each KV head's keys and
    values as [S, H] tiles (positions on sublanes, head dim on lanes), so that one DMA per (page, head)
    brings both. Same contract as KVCache (see kv_cache.py): tables, dropped writes, stale entries hidden
    by the causal mask."""

    kv: jax.Array  # [L, P, K, 2, S, H]

    @classmethod
    def shape_dtype(cls, cfg: ModelConfig, pages: int, page_size: int) -> TpuKVCache:
        shape = (cfg.n_layers, pages, cfg.n_kv_heads, 2, page_size, cfg.head_dim)
        return cls(kv=jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.cache_dtype)))

    @classmethod
    def zeros(cls, cfg: ModelConfig, pages: int, page_size: int) -> TpuKVCache:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cls.shape_dtype(cfg, pages, page_size))

    @staticmethod
    def axes() -> TpuKVCache:
        return TpuKVCache(kv=("layers", None, "kv_heads", None, None, "head_dim"))

    @property
    def pages(self) -> int:
        return self.kv.shape[1]

    @property
    def page_size(self) -> int:
        return self.kv.shape[4]

    def write(self, layer, table, positions, k, v, write_from=None) -> TpuKVCache:
        page, offset = write_targets(table, positions, write_from, self.pages, self.page_size)
        # advanced indices around slices: the indexed dims [b, T] come first, then K, 2, H
        kv = jnp.stack([k, v], axis=-2).astype(self.kv.dtype)
        return TpuKVCache(kv=self.kv.at[layer, page, :, :, offset].set(kv, mode="drop"))

    def copy_page(self, src, dst) -> TpuKVCache:
        return TpuKVCache(kv=self.kv.at[:, dst].set(self.kv[:, src]))


@struct.dataclass
class GpuKVCache:
    """The pool in the layout of jax's GPU kernel: k, v [K, L, P, S, H] (see the module's docstring). Same
    contract as KVCache, whose `read` it also offers for the plain path."""

    k: jax.Array  # [K, L, P, S, H]
    v: jax.Array  # [K, L, P, S, H]

    @classmethod
    def shape_dtype(cls, cfg: ModelConfig, pages: int, page_size: int) -> GpuKVCache:
        shape = (cfg.n_kv_heads, cfg.n_layers, pages, page_size, cfg.head_dim)
        return cls(*(jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.cache_dtype)) for _ in range(2)))

    @classmethod
    def zeros(cls, cfg: ModelConfig, pages: int, page_size: int) -> GpuKVCache:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cls.shape_dtype(cfg, pages, page_size))

    @staticmethod
    def axes() -> GpuKVCache:
        return GpuKVCache(*(("kv_heads", "layers", None, None, "head_dim") for _ in range(2)))

    @property
    def pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    def write(self, layer, table, positions, k, v, write_from=None) -> GpuKVCache:
        page, offset = write_targets(table, positions, write_from, self.pages, self.page_size)
        # the indexed dims (layer, page, offset) are adjacent: they become [b, T] in place, after K
        k, v = (x.transpose(2, 0, 1, 3).astype(self.k.dtype) for x in (k, v))  # [K, b, T, H]
        return GpuKVCache(
            k=self.k.at[:, layer, page, offset].set(k, mode="drop"),
            v=self.v.at[:, layer, page, offset].set(v, mode="drop"),
        )

    def read(self, layer, pages):
        """KVCache.read: one page per row, `pages` [b] -> k [b, K, H, S], v [b, K, S, H]."""
        k, v = (x.at[:, layer, pages].get(mode="clip") for x in (self.k, self.v))  # [K, b, S, H]
        return k.transpose(1, 0, 3, 2), v.transpose(1, 0, 2, 3)

    def copy_page(self, src, dst) -> GpuKVCache:
        return GpuKVCache(k=self.k.at[:, :, dst].set(self.k[:, :, src]), v=self.v.at[:, :, dst].set(self.v[:, :, src]))


# cfg.attention -> its pool
LAYOUTS = {"plain": KVCache, "cpu_kernel": CpuKVCache, "tpu_kernel": TpuKVCache, "gpu_kernel": GpuKVCache}


def kv_cache_for(cfg: ModelConfig) -> type[KVCache] | type[CpuKVCache] | type[TpuKVCache] | type[GpuKVCache]:
    """The pool's class for cfg.attention."""
    return LAYOUTS[cfg.attention]


def attend(c: ModelConfig, q, cache, layer, table, positions, window: int, local, plain: Callable):
    """transformer.paged_attention by cfg.attention's kernel: same arguments, same result. `plain` is the
    plain path, for what the GPU kernel does not compute."""
    if c.attention == "cpu_kernel":
        return _cpu(c, q, cache, layer, table, positions, window, local)
    if c.attention == "tpu_kernel":
        return _tpu(c, q, cache, layer, table, positions, window, local)
    args = (c, q, cache, layer, table, positions, window, local)
    if q.shape[1] > 1:  # a prefill chunk
        return plain(*args)
    if not c.local_layers:
        return _gpu_decode(*args)
    return jax.lax.cond(local, lambda: plain(*args), lambda: _gpu_decode(*args))


def _gpu_decode(c: ModelConfig, q, cache: GpuKVCache, layer, table, positions, window: int, local):
    """One decode token per row [B, 1, N, H] by jax's GPU kernel (global layers: `local` is not read)."""
    B, _, N, H = q.shape
    K, L, P, S, _ = cache.k.shape
    table = jnp.asarray(table)[:, : window // S]
    table = jnp.where(table < P, table, 0) + layer * P  # the layer's pages among every layer's (K, L * P)
    columns = table.shape[1]
    splits = min(columns, 16)  # the page columns split over parallel programs (a power of two: divides them)
    # the kernel has no softmax scale: the queries carry it
    scaled = (q[:, 0].astype(jnp.float32) * c.attention_scale).astype(q.dtype)
    out = gpu.paged_attention(
        scaled,
        cache.k.reshape(K, L * P, S, H),
        cache.v.reshape(K, L * P, S, H),
        table,
        positions[:, 0] + 1,
        pages_per_compute_block=min(8, columns // splits),
        k_splits=splits,
        interpret=jax.default_backend() != "gpu",
    )
    return out[:, None].astype(jnp.dtype(c.dtype))


def _cpu(c: ModelConfig, q, cache: KVCache, layer, table, positions, window: int, local):
    """The step's rows by jaxserve's CPU kernel, reading `cache`'s arrays (float32, or bfloat16 as its bits)
    where they lie."""
    assert kernels.available(), "the CPU kernel is not built here (choose serves the plain path then)"
    table = jnp.asarray(table)[:, : window // cache.page_size]
    sliding = c.sliding_window if c.local_layers else 0
    out = kernels.attention(q, cache.k, cache.v, layer, table, positions, local, c.attention_scale, sliding)
    return out.astype(jnp.dtype(c.dtype))


def _tpu(c: ModelConfig, q, cache: TpuKVCache, layer, table, positions, window: int, local):
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
    """`cfg` with the attention to serve with on `backend` (default: jax's), logged: the CPU's, a TPU's or a
    GPU's kernel where it takes the model's shapes (on the device itself: where its compiler takes them
    too), else the plain path, with the reason."""
    backend = backend or jax.default_backend()
    attention = {"cpu": "cpu_kernel", "tpu": "tpu_kernel", "gpu": "gpu_kernel"}.get(backend)
    if attention is None:
        log.info("attention: plain (XLA) on %s", backend)
        return dataclasses.replace(cfg, attention="plain")
    kernel_cfg = dataclasses.replace(cfg, attention=attention)
    refused = _refusals(kernel_cfg, page_size)
    if mesh.size > 1:  # a kernel's call is not partitioned by XLA: it would gather the whole pool to each chip
        refused.append(f"a mesh of {mesh.size} devices (the kernel is not yet mapped over it with shard_map)")
    # a Pallas kernel is tried on the device's compiler; the CPU kernel was compiled by kernels.available()
    if not refused and backend == jax.default_backend() and attention != "cpu_kernel":
        refused += _compile(kernel_cfg, page_size)
    if refused:
        log.warning("attention: plain (XLA), not the %s kernel: %s", backend.upper(), "; ".join(refused))
        return dataclasses.replace(cfg, attention="plain")
    log.info("attention: the %s kernel (%s)", backend.upper(), attention)
    return kernel_cfg


def _refusals(c: ModelConfig, page_size: int) -> list[str]:
    """The model's shapes a kernel does not take, each said."""
    if c.attention == "cpu_kernel":
        refused = [] if kernels.available() else ["jaxserve's kernels are not built here (see jaxserve.kernels)"]
        if c.head_dim % kernels.LANES:
            refused.append(f"head dim {c.head_dim} is not a multiple of {kernels.LANES}")
        if page_size % kernels.LANES:
            refused.append(f"page size {page_size} is not a multiple of {kernels.LANES}")
        return refused
    if c.attention == "tpu_kernel":
        if page_size % tpu.PAGE_MULTIPLE:
            return [f"page size {page_size} is not a multiple of {tpu.PAGE_MULTIPLE}"]
        return []
    refused = []  # Triton blocks: power-of-two sizes, matmul dims of at least 16
    if jnp.dtype(c.cache_dtype).itemsize < jnp.dtype(c.dtype).itemsize:
        # its second matmul takes the probabilities in the pages' dtype: attention would not stay in c.dtype
        refused.append(f"a {c.cache_dtype} KV pool under {c.dtype} activations (it rounds the probabilities)")
    if c.head_dim < 16 or c.head_dim & (c.head_dim - 1):
        refused.append(f"head dim {c.head_dim} is not a power of two of at least 16")
    if page_size < 16 or page_size & (page_size - 1):
        refused.append(f"page size {page_size} is not a power of two of at least 16")
    return refused


def _compile(c: ModelConfig, page_size: int) -> list[str]:
    """[] if the device's compiler takes the kernel at the model's head shapes (one decode row over a
    small pool), else what it said."""
    one = dataclasses.replace(c, n_layers=1, local_layers=())
    cache = kv_cache_for(one).shape_dtype(one, 2, page_size)
    q = jax.ShapeDtypeStruct((1, 1, c.n_heads, c.head_dim), jnp.dtype(c.dtype))
    index = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    kernel = _tpu if c.attention == "tpu_kernel" else _gpu_decode
    step = lambda q, cache, table, positions: kernel(one, q, cache, 0, table, positions, page_size, False)
    try:
        jax.jit(step).lower(q, cache, index, index).compile()
    except Exception as e:  # any refusal by the compiler means: not this kernel here
        return [f"the compiler refused it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"]
    return []
