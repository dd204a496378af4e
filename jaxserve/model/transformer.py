"""Flax (linen) decoder of the Llama, Mistral, Qwen 2/3 and Gemma 3 families that reads and writes a KV cache.

One forward serves every use: a prefill of T tokens per sequence or a decode of one token per sequence.
Each token carries its absolute position; its K/V are written into its sequence's pages (the page table)
at that position first, then every query attends over the window [0, W) of its pages with keys at
positions <= its own. Stale entries from a page's previous owner always sit at later positions, so the
causal mask hides them without a reset.
Layers run under `nn.scan` (compile time does not grow with depth) with the whole cache in the carry so
the step updates it in place. Every parameter carries logical axis names (see jaxserve.sharding).

Families differ only through ModelConfig's switches. Layers of one model differ in one way, local (sliding
window, their own RoPE base) or global; each layer looks its kind up by its scanned index, so the stack
stays one scan with one set of stacked weights.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxserve.model import attention_kernels, blocks, quant
from jaxserve.model import lora as lora_math
from jaxserve.model.config import ModelConfig, RopeScaling
from jaxserve.model.kv_cache import KVCache


def _param(module: nn.Module, name: str, shape, axes, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def ordered_sum(x):
    """The sum over x's last axis (kept, as 1), the same bits whatever the other axes hold: its halves
    added element by element down to one (zeros past a power of two). XLA:CPU's reduction sums one or two
    rows in another order than eight (2e-7 apart), which quantized activations round into larger
    differences: a decode step then differed from a prefill of the same tokens."""
    n = x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (1 << (n - 1).bit_length()) - n)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, in float32. (Gemma's `1 + w` is stored as the scale itself.)"""

    eps: float
    dtype: jnp.dtype
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones, self.dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(ordered_sum(x32 * x32) / x.shape[-1] + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """cos/sin [B, T, H] for rotate-half RoPE (HF layout; GGUF's pairwise layout is undone on import)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [B, T, heads, H]; cos/sin [B, T, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def paged_attention(c: ModelConfig, q, cache: KVCache, layer, table, positions, window: int, local):
    """q [B, T, N, H] of tokens at `positions` [B, T] attending over positions [0, window) of each row's
    pages (`table` [B, ...]) in `layer` of the pool, keys at positions <= their own (and within the sliding
    window on a `local` layer) -> [B, T, N, H]. The seam for a platform kernel: with c.attention other than
    "plain" the kernel of that name computes it, from the pool in its own layout
    (jaxserve.model.attention_kernels)."""
    if c.attention != "plain":
        return attention_kernels.attend(c, q, cache, layer, table, positions, window, local, plain_attention)
    return plain_attention(c, q, cache, layer, table, positions, window, local)


def plain_attention(c: ModelConfig, q, cache, layer, table, positions, window: int, local):
    """paged_attention in jnp, over any pool offering KVCache's `read`: a scan over the window's pages with
    a running softmax (flash-decoding's): each step reads one page per row, which stays in cache between
    its two matmuls, instead of gathering the whole window into one copy first."""
    B, T = positions.shape
    K, H, S = c.n_kv_heads, c.head_dim, cache.page_size
    assert window % S == 0, f"the window {window} is not a whole number of {S}-position pages"
    # GQA without repeating K/V: the G query heads of each KV head and the T tokens form the rows of one
    # [G*T, H] x [H, S] matmul per (row, KV head). Query head n = k * G + g, as in HF's repeat_kv.
    G = c.n_heads // K
    q = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    pos = positions[:, None, :, None]  # [B, 1, T, 1] against key positions [S]
    compute = jnp.promote_types(q.dtype, jnp.dtype(c.cache_dtype))

    def page(carry, xs):
        top, total, acc = carry  # running max and sum of exp(score - max) [B, K, G*T], weighted values [.., H]
        column, pages = xs  # the column of the page tables, and its page for each row [B]
        # [B, K, H, S], [B, K, S, H], upcast from the pool's dtype where it is narrower (bfloat16 pages under
        # float32 activations: the matmuls and the softmax stay in float32)
        keys, values = (x.astype(compute) for x in cache.read(layer, pages))
        scores = jnp.einsum("bkrh,bkhs->bkrs", q, keys).astype(jnp.float32) * c.attention_scale
        key_pos = column * S + jnp.arange(S)
        mask = key_pos <= pos  # [B, 1, T, S]
        if c.local_layers:  # a local layer sees only the last sliding_window positions, its own included
            mask &= ~local | (key_pos > pos - c.sliding_window)
        scores = jnp.where(mask[:, :, None], scores.reshape(B, K, G, T, S), -jnp.inf).reshape(B, K, G * T, S)
        new_top = jnp.maximum(top, scores.max(-1))
        shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # a row with nothing visible yet stays at 0
        probs = jnp.exp(scores - shift[..., None])
        scale = jnp.exp(top - shift)
        acc = acc * scale[..., None] + jnp.einsum("bkrs,bksh->bkrh", probs.astype(values.dtype), values)
        return (new_top, total * scale + probs.sum(-1), acc), None

    rows = (B, K, G * T)
    init = (jnp.full(rows, -jnp.inf), jnp.zeros(rows), jnp.zeros((*rows, H)))
    n = window // S
    (_, total, acc), _ = jax.lax.scan(page, init, (jnp.arange(n), jnp.asarray(table)[:, :n].T))
    attn = (acc / total[..., None]).astype(jnp.dtype(c.dtype)).reshape(B, K, G, T, H)
    return attn.transpose(0, 3, 1, 2, 4).reshape(B, T, c.n_heads, H)


class Block(nn.Module):
    """One decoder layer; scanned over layers with carry (x, cache, layer index). cos/sin [R, B, T, H] hold
    R = 1 RoPE table, or 2 when local layers have their own base (global first)."""

    cfg: ModelConfig
    formulation: quant.Formulation

    @nn.compact
    def __call__(self, carry, positions, cos, sin, table, write_from, window: int, stacked=None, lora=None, rows=None):
        """`stacked`: None, or with packed int8 weights the layers' whole stacks {name: (kernel, scale)},
        which the matmuls then read in place (see `quant.dot`). `lora`: None, or this layer's adapter stack
        {target: (A, B)} and `rows` (a lora.Route) each row's adapter (see jaxserve.model.lora)."""
        x, cache, layer = carry
        c = self.cfg

        def project(name, spec, x, w):  # the base projection plus each row's adapter
            y = quant.dot(spec, x, w, self.formulation)
            return y if lora is None else lora_math.apply(name, y, x, lora[name], rows)

        def weight(name, shape, axes, a):
            w = quant.weight(self, c, name, shape, axes, a)
            if stacked is None:
                return w
            return stacked[name].at(layer) if c.quant == "blocks" else (*stacked[name], layer)

        dt = jnp.dtype(c.dtype)
        local = jnp.asarray(c.layer_is_local())[layer]
        rope = local.astype(jnp.int32) if cos.shape[0] == 2 else 0
        cos, sin = cos[rope], sin[rope]

        h = RMSNorm(c.norm_eps, dt, name="attn_norm")(x)
        wq = weight("q", (c.dim, c.n_heads, c.head_dim), ("embed", "q_heads", "head_dim"), 0)
        wk = weight("k", (c.dim, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), 0)
        wv = weight("v", (c.dim, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), 0)
        wo = weight("o", (c.n_heads, c.head_dim, c.dim), ("q_heads", "head_dim", "embed"), 1)
        q = project("q", "btd,dnh->btnh", h, wq)
        k = project("k", "btd,dkh->btkh", h, wk)
        v = project("v", "btd,dkh->btkh", h, wv)
        if c.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (c.n_heads, c.head_dim), ("q_heads", "head_dim"), zeros, dt)
            k = k + _param(self, "k_bias", (c.n_kv_heads, c.head_dim), ("kv_heads", "head_dim"), zeros, dt)
            v = v + _param(self, "v_bias", (c.n_kv_heads, c.head_dim), ("kv_heads", "head_dim"), zeros, dt)
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, dt, "head_dim", name="q_norm")(q)
            k = RMSNorm(c.norm_eps, dt, "head_dim", name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        cache = cache.write(layer, table, positions, k, v, write_from)
        attn = paged_attention(c, q, cache, layer, table, positions, window, local)
        attn = project("o", "btnh,nhd->btd", attn, wo)
        if c.sandwich_norms:
            attn = RMSNorm(c.norm_eps, dt, name="post_attn_norm")(attn)
        x = x + attn

        h = RMSNorm(c.norm_eps, dt, name="mlp_norm")(x)
        # gate and up projections as one [D, 2, F] weight: one matmul (and one int8 dequantization) instead
        # of two
        wgu = weight("gate_up", (c.dim, 2, c.mlp_dim), ("embed", None, "mlp"), 0)
        wd = weight("down", (c.mlp_dim, c.dim), ("mlp", "embed"), 0)
        gate_up = project("gate_up", "btd,dcf->btcf", h, wgu)
        act = nn.silu if c.activation == "silu" else partial(jax.nn.gelu, approximate=True)
        out = project("down", "btf,fd->btd", act(gate_up[:, :, 0]) * gate_up[:, :, 1], wd)
        if c.sandwich_norms:
            out = RMSNorm(c.norm_eps, dt, name="post_mlp_norm")(out)
        return (x + out, cache, layer + 1), None


class Embedding(nn.Module):
    """Token embedding [V, D], also the tied output projection (logits = x . E^T)."""

    cfg: ModelConfig
    formulation: quant.Formulation

    def setup(self):
        c = self.cfg
        # int8: a scale per vocabulary row (the output channel of the logits) and group of D
        w = quant.weight(self, c, "embedding", (c.vocab_size, c.dim), ("vocab", "embed"), 1)
        self.blocks = w if c.quant == "blocks" else None  # GGUF blocks (jaxserve.model.blocks)
        self.table, self.scale = (None, None) if c.quant == "blocks" else w

    def __call__(self, tokens):
        if self.blocks is not None:
            woven = blocks.interleaved(self.blocks, self.formulation)
            return self.blocks.rows(tokens, woven).astype(jnp.dtype(self.cfg.dtype))
        if self.scale is None:
            return self.table[tokens]
        return quant.dequantize(self.table[tokens], self.scale[tokens]).astype(jnp.dtype(self.cfg.dtype))

    def attend(self, x):
        if self.blocks is not None:
            return quant.dot("btd,vd->btv", x, self.blocks, self.formulation)
        if self.scale is None:
            return quant.dot("btd,vd->btv", x, (self.table, None))
        return quant.tied_logits(x, self.table, self.scale, self.formulation)


class Transformer(nn.Module):
    """`__call__` = `logits(hidden(...))`; the two halves are separate methods so a prefill can compute
    logits for every prompt position (echo scoring) or for the last one only. `formulation`: how its int8
    matmuls compute (see quant.Formulation; float weights ignore it)."""

    cfg: ModelConfig
    formulation: quant.Formulation = quant.Formulation()

    def setup(self):
        c = self.cfg
        self.embed = Embedding(c, self.formulation)
        self.layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 7 + (0, nn.broadcast),  # the adapter stack is sliced per layer
            length=c.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.formulation)
        self.final_norm = RMSNorm(c.norm_eps, jnp.dtype(c.dtype))
        if not c.tie_embeddings:
            self.lm_head = quant.weight(self, c, "lm_head", (c.dim, c.vocab_size), ("embed", "vocab"), 0)

    def __call__(self, tokens, positions, cache: KVCache, table, window: int, write_from=None, adapters=None):
        """tokens, positions [B, T] int32 -> (logits [B, T, V] float32, updated cache). See `hidden`."""
        x, cache = self.hidden(tokens, positions, cache, table, window, write_from, adapters)
        return self.logits(x), cache

    def hidden(self, tokens, positions, cache: KVCache, table, window: int, write_from=None, adapters=None):
        """tokens, positions [B, T] int32 -> (final-normed hidden states [B, T, D], updated cache).

        `table` [B, pages per sequence] names each row's pages (see KVCache). `window` (static, a whole
        number of pages) must exceed every position in `positions`; attention reads only positions
        [0, window). Positions before `write_from` [B] (None: all written) are already in shared pages.
        `adapters`: None, or (the LoRA stack {target: (A, B)}, each row's adapter index [B]; 0: none).
        """
        c = self.cfg
        x = self.embed(tokens)
        if c.embed_scale:  # Gemma: sqrt(D) rounded to the activations' dtype first, as HF does
            x = x * jnp.asarray(c.dim**0.5, x.dtype)
        tables = [rope_tables(positions, c.head_dim, c.rope_theta, c.rope_scaling)]
        if c.rope_local_theta is not None:
            tables.append(rope_tables(positions, c.head_dim, c.rope_local_theta))
        cos, sin = (jnp.stack(t) for t in zip(*tables))  # [R, B, T, H]
        stacked = None
        if c.quant == "blocks" and not self.is_initializing():  # block weights: always read in place
            stacked = blocks.stacks(self.variables["params"]["layers"], dict(c.block_formats))
        elif self.formulation.kernel_below_rows is not None and not self.is_initializing():  # packed: in place
            layers = self.variables["params"]["layers"]
            stacked = {n: (layers[n], layers[n + "_scale"]) for n in quant.int8_names(layers)}
        lora, rows = None, None
        if adapters is not None:
            lora, index = adapters
            rows = lora_math.route(lora, index)
        carry = (x, cache, jnp.int32(0))
        (x, cache, _), _ = self.layers(carry, positions, cos, sin, table, write_from, window, stacked, lora, rows)
        return self.final_norm(x), cache

    def logits(self, x):
        """Hidden states [B, T, D] -> logits [B, T, V] float32."""
        if self.cfg.tie_embeddings:
            return self.embed.attend(x).astype(jnp.float32)
        return quant.dot("btd,dv->btv", x, self.lm_head, self.formulation).astype(jnp.float32)
