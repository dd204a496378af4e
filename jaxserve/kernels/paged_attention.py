"""jaxserve's paged attention kernel for TPU (Pallas/Mosaic), runnable on CPU in TPU interpret mode.

Its algorithm is jax's ragged paged attention (jax.experimental.pallas.ops.tpu.ragged_paged_attention):
each program owns one row's queries for one KV head, fetches that row's pages from HBM by DMA through
the page table (a scalar-prefetch operand), a block of pages at a time, and keeps a running softmax
(flash attention). It is our own copy rather than jax's kernel because of what jaxserve's forward is:

- The KV pool is stacked over the layers and carried through the layer scan; jax's kernel takes one
  layer's pages, and slicing a layer out of the carry is a copy of it every step. Here the pool is
  [L, P, K, 2, S, H] and the layer is a traced scalar: the DMA reads the layer in place.
- Which layers are local (sliding window) is a traced index inside that scan; jax's `sliding_window` is a
  static argument. Here the window is a traced scalar too, so one compiled kernel serves both kinds.
- A page holds each KV head's K and V as [S, H] tiles (S positions on sublanes, H on lanes), so a head's
  keys are one untiled index away: no K/V de-interleaving by strided loads or bitcasts, hence no
  constraint on the number of KV heads (jax's needs 2K in {1, 2, 4, 8} or a multiple of 8, which
  SmolLM2's 3 fail) and no ref reshapes or bitcasts, which jax 0.10's TPU interpreter cannot run (so jax's
  kernel cannot be checked on CPU at all).
- jaxserve's steps are rectangular (B rows of T consecutive positions: a prefill chunk or decode rows),
  so the rows need no ragged bookkeeping: row b's queries sit at positions lens[b] - T ... lens[b] - 1.

Invariants: S is a multiple of 16 (bfloat16 sublane tiling); every table entry read is a real page
(callers clamp "no page" entries, whose keys the causal mask hides anyway).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NO_WINDOW = 1 << 30  # the window scalar of a global layer: no key is too old
KEYS_PER_BLOCK = 512  # keys fetched and scored at once (pages per block = this // S, at least 1)
PAGE_MULTIPLE = 16  # S must be a multiple of this: the sublane tiling of bfloat16


def _kernel(
    # scalar prefetch (SMEM)
    layer_ref,  # [1]
    window_ref,  # [1] keys at positions <= query - window are masked (NO_WINDOW: none)
    lens_ref,  # [B] positions written for each row, its queries' included
    table_ref,  # [B, pages per sequence]
    # operands
    q_ref,  # [R, H]: the row's T queries x G query heads of this KV head, row r = t * G + g
    kv_hbm,  # [L, P, K, 2, S, H] in HBM
    # output
    o_ref,  # [R, H]
    # scratch
    buf,  # [pages per block, 2, S, H] in VMEM
    sems,  # [pages per block] DMA semaphores
    *,
    scale: float,
    queries: int,  # T
):
    b, head = pl.program_id(0), pl.program_id(1)
    per_block, _, S, H = buf.shape
    rows = q_ref.shape[0]
    group = rows // queries
    keys = per_block * S
    pages_per_seq = table_ref.shape[1]
    length, window = lens_ref[b], window_ref[0]
    first_query = length - queries
    # the blocks holding a visible key: from the oldest key the first query may see to the last query
    lo = jnp.maximum(first_query - window + 1, 0) // keys
    hi = pl.cdiv(length, keys)

    q = q_ref[...].astype(jnp.float32) * scale
    q_pos = first_query + jax.lax.broadcasted_iota(jnp.int32, (rows, keys), 0) // group

    def copies(block):
        out = []
        for j in range(per_block):
            column = jnp.minimum(block * per_block + j, pages_per_seq - 1)
            src = kv_hbm.at[layer_ref[0], table_ref[b, column], head]
            out.append(pltpu.make_async_copy(src, buf.at[j], sems.at[j]))
        return out

    def body(block, carry):
        top, total, acc = carry  # running max and sum of exp(score - max) [R, 1], weighted values [R, H]
        dmas = copies(block)
        for dma in dmas:
            dma.start()
        for dma in dmas:
            dma.wait()
        k = buf[:, 0].reshape(keys, H).astype(jnp.float32)
        v = buf[:, 1].reshape(keys, H).astype(jnp.float32)
        scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        k_pos = block * keys + jax.lax.broadcasted_iota(jnp.int32, (rows, keys), 1)
        visible = (k_pos <= q_pos) & (k_pos > q_pos - window)
        scores = jnp.where(visible, scores, -jnp.inf)
        new_top = jnp.maximum(top, scores.max(axis=1, keepdims=True))
        shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)  # a row with nothing visible yet stays at 0
        probs = jnp.exp(scores - shift)
        rescale = jnp.exp(top - shift)
        acc = acc * rescale + jnp.dot(probs, v, preferred_element_type=jnp.float32)
        return new_top, total * rescale + probs.sum(axis=1, keepdims=True), acc

    init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32), jnp.zeros((rows, H)))
    _, total, acc = jax.lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / total).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def paged_attention(q, kv, layer, window, lens, table, *, scale: float, interpret: bool = False):
    """q [B, T, K, G, H] of each row's T consecutive positions ending at lens[b] - 1, over layer `layer` of
    the pool kv [L, P, K, 2, S, H] through `table` [B, columns] (every entry a page of the pool), keys
    within `window` positions of their query (NO_WINDOW: all before it) -> [B, T, K, G, H] in q's dtype.
    `interpret`: run in TPU interpret mode (on CPU, for tests)."""
    B, T, K, G, H = q.shape
    S = kv.shape[4]
    assert S % PAGE_MULTIPLE == 0, f"page size {S} is not a multiple of {PAGE_MULTIPLE}"
    per_block = max(1, min(table.shape[1], KEYS_PER_BLOCK // S))
    rows = q.transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)  # a KV head's queries as one [T*G, H] tile
    block = pl.BlockSpec((None, None, T * G, H), lambda b, k, *_: (b, k, 0, 0))
    call = pl.pallas_call(
        functools.partial(_kernel, scale=scale, queries=T),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, K),
            in_specs=[block, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=block,
            scratch_shapes=[pltpu.VMEM((per_block, 2, S, H), kv.dtype), pltpu.SemaphoreType.DMA((per_block,))],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        out_shape=jax.ShapeDtypeStruct(rows.shape, q.dtype),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxserve_paged_attention",
    )
    scalars = (
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        jnp.reshape(window, (1,)).astype(jnp.int32),
        lens.astype(jnp.int32),
        table.astype(jnp.int32),
    )
    out = call(*scalars, rows, kv)
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)
