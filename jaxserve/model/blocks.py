"""GGUF block-quantized matmul weights, served as the file stores them: Q4_0, Q4_1 and Q8_0.

A weight of such a format keeps the file's own values (no dequantize-and-requantize): a block of 32
consecutive inputs of one output channel is w = d * q + m (Q4_1), d * (q - 8) (Q4_0) or d * q (Q8_0), with
float16 d and m. It is held as up to three parameters beside each other, each [outputs..., last axis]:

    name     the codes, uint8 [outputs..., K / 2] (two 4-bit codes a byte, packed as GGUF packs them: byte j
             of a block holds input j in its low nibble, input j + 16 in its high one), or int8 [.., K] (Q8_0)
    name_d   the block scales, float16 [outputs..., K / 32]
    name_m   (Q4_1) the block offsets, float16 [outputs..., K / 32]

Output channels first (GGUF's [out, in] rows): one channel's blocks are one contiguous run, which is what
the kernel (jaxserve/kernels/block_matmul.cc) reads, and what `dequantize` here turns into float weights for
XLA's formulations (float32 or bfloat16 products, as for int8). Every format of a model is recorded per
weight in ModelConfig.block_formats.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxserve import kernels

QK = 32  # inputs per block, every format
FORMATS = ("q4_0", "q4_1", "q8_0")
CHUNK = 4096  # output channels dequantized at once where a weight is larger (the vocabulary): see `dot`


def code_width(fmt: str, k: int) -> int:
    """Bytes of codes of one output channel of `k` inputs."""
    return k if fmt == "q8_0" else k // 2


def parts(fmt: str) -> tuple[str, ...]:
    """The parameter suffixes of a weight in `fmt`: codes, scales (and offsets)."""
    return ("", "_d", "_m") if fmt == "q4_1" else ("", "_d")


def from_gguf(raw: np.ndarray, fmt: str) -> tuple[np.ndarray, ...]:
    """A GGUF tensor's bytes [rows, blocks * block bytes] -> its parts (codes, d[, m]), [rows, ...] each."""
    rows = raw.shape[0]
    head = 4 if fmt == "q4_1" else 2  # f16 d (and m) before each block's codes
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, head + code_width(fmt, QK))
    codes = blocks[:, :, head:].reshape(rows, -1)
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16).reshape(rows, -1)
    if fmt == "q8_0":
        return codes.view(np.int8), d
    if fmt == "q4_0":
        return codes, d
    return codes, d, np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16).reshape(rows, -1)


def quantize(w: np.ndarray, fmt: str) -> tuple[np.ndarray, ...]:
    """Float weights [rows, K] -> parts in `fmt`, by gguf's own quantizer (llama.cpp's reference one)."""
    import gguf

    raw = gguf.quants.quantize(np.asarray(w, np.float32), gguf.GGMLQuantizationType[fmt.upper()])
    return from_gguf(raw, fmt)


def dequantize(fmt: str, codes, d, m=None, xp=np):
    """Parts [..., N, ...] -> float32 weights [..., N, K], in NumPy (xp=np) or inside a jitted step (jnp)."""
    lead = codes.shape[:-1]
    if fmt == "q8_0":
        q = codes.astype(xp.float32).reshape(*lead, -1, QK)
    else:
        b = codes.reshape(*lead, -1, QK // 2)
        q = xp.concatenate([b & 15, b >> 4], axis=-1).astype(xp.float32)  # [.., blocks, 32]
        if fmt == "q4_0":
            q = q - 8
    w = q * d.astype(xp.float32)[..., None]
    if m is not None:
        w = w + m.astype(xp.float32)[..., None]
    return w.reshape(*lead, -1)


@dataclasses.dataclass(frozen=True)
class BlockWeight:
    """A block-quantized weight as the model reads it: `arrays` (codes, d[, m]) [outputs..., ...], or
    stacked over the layers [L, outputs..., ...] with `layer` naming one (read in place by the kernel)."""

    fmt: str
    arrays: tuple
    outputs: tuple[int, ...]
    layer: object = None
    name: str = ""  # the parameter's

    def at(self, layer) -> BlockWeight:
        return dataclasses.replace(self, layer=layer)

    def rows(self, tokens, woven: bool = False) -> jax.Array:
        """Rows `tokens` [...] of an embedding table [V, D] (`woven`: held interleaved) -> float32 [..., D]."""
        arrays = tuple(interleaved_rows(a, tokens) if woven else a[tokens] for a in self.arrays)
        return dequantize(self.fmt, *arrays, xp=jnp)


def declare(module: nn.Module, fmt: str, name: str, shape, axes, a: int) -> BlockWeight:
    """The parameters of a matmul weight of model shape `shape` (inputs up to axis `a`, outputs after it;
    an embedding [V, D] with a = 1: outputs V) in `fmt`, each [outputs..., ...] with its outputs' axes."""
    table = a == len(shape) - 1
    outputs, out_axes = (shape[:a], axes[:a]) if table else (shape[a + 1 :], axes[a + 1 :])
    k = shape[a] if table else math.prod(shape[: a + 1])
    assert k % QK == 0, f"{name}: {k} inputs are not whole blocks of {QK}"
    sizes = {"": code_width(fmt, k), "_d": k // QK, "_m": k // QK}
    dtypes = {"": jnp.int8 if fmt == "q8_0" else jnp.uint8, "_d": jnp.float16, "_m": jnp.float16}
    init = nn.initializers.zeros
    arrays = tuple(
        module.param(name + p, nn.with_logical_partitioning(init, (*out_axes, None)), (*outputs, sizes[p]), dtypes[p])
        for p in parts(fmt)
    )
    return BlockWeight(fmt, arrays, tuple(outputs), name=name)


def stacks(layers: dict, formats: dict[str, str]) -> dict[str, BlockWeight]:
    """The layers' block weights, each as its whole stack over the layers (see BlockWeight)."""
    out = {}
    for name, fmt in formats.items():
        if name in layers:
            arrays = tuple(layers[name + p] for p in parts(fmt))
            out[name] = BlockWeight(fmt, arrays, tuple(arrays[0].shape[1:-1]), name=name)
    return out


# Under the "q8" formulation every weight whose outputs are whole groups of GROUP multiplies on quantized
# activations (integer dot products): the MLP's gate and up, half of SmolLM2's layer weights, on 8 bits a
# value; the others (the attention projections, down, and the logits' Q8_0 embedding) on 16 bits, as near
# float32 as makes no difference to their answers and, at 8 rows and more, faster than float32 ones (SmolLM2,
# AMD EPYC, a decode step's matmuls, ms, int16 against float32 for them: 8 rows 14.6/18.4, 32 rows 38/50,
# 64 rows 71/96; 1 row even within the noise). On 8 bits they tipped answers. The keys and values are
# written to the cache and read again at every later position, so their errors add up along the sequence
# (SmolLM2 teacher-forced against tests/reference, 192 positions: every matmul on 8 bits, 96.4% top-1; all
# but these two, 97.4%). The down projection's inputs, the MLP's gated products, carry a few values far
# larger than the rest of their block, which rounding to 8 bits a block then wipes out: with it on 8 bits
# SmolLM2 answers "What is the capital of France?" in its chat template with "L'Etoile, la Marseillaise,
# ..." -- as llama.cpp's own Q4_1 path does -- and otherwise "Paris". The query and output projections on
# 8 bits still tipped that answer's first token ("The" -1.88 against "L" -1.97 in float32, -1.96 against
# -1.91 with them on 8 bits; gate and up on 8 bits and the rest on 16, -1.83 against -1.94).
Q8_INPUTS = frozenset({"gate_up"})


GROUP = 16  # weight rows interleaved together: the kernel's lanes


def interleaved(w: BlockWeight, f) -> bool:
    """Whether `w` is held interleaved (`interleave`) for formulation `f`: a weight multiplied on quantized
    activations at every row count, its outputs whole groups of GROUP."""
    return f.q8 and math.prod(w.outputs) % GROUP == 0


def x_bits(w: BlockWeight, f) -> int:
    """The bits of the activations `w` multiplies under formulation `f`: 8 for Q8_INPUTS' interleaved
    weights, 16 for the other interleaved ones, 32 (float) for the rest."""
    if not interleaved(w, f):
        return 32
    return 8 if w.name in Q8_INPUTS else 16


def _code_bytes(a) -> int | None:
    """A block's bytes of codes, if `a` is a weight's codes (d and m are float16)."""
    return {jnp.dtype(jnp.uint8): 16, jnp.dtype(jnp.int8): 32}.get(jnp.dtype(a.dtype))


def interleave(arrays: tuple) -> tuple:
    """A weight's parts (codes, d[, m]) [L, outputs..., last], the outputs flattened to N, laid out as the
    kernel reads them on quantized activations: GROUP rows at a time, block by block, four bytes of each
    row's block after another's: codes [L, N / 16, blocks, block bytes / 4, 16 rows, 4 bytes], d and m
    [L, N / 16, blocks, 16 rows]. Same shapes and elements, other order."""
    out = []
    for a in arrays:
        lead, last, bb = a.shape[0], a.shape[-1], _code_bytes(a)
        if bb:
            grouped, order = (lead, -1, GROUP, last // bb, bb // 4, 4), (0, 1, 3, 4, 2, 5)
        else:
            grouped, order = (lead, -1, GROUP, last), (0, 1, 3, 2)
        out.append(jnp.transpose(jnp.reshape(a, grouped), order).reshape(a.shape))
    return tuple(out)


def interleaved_rows(a, tokens):
    """Rows `tokens` [...] of a table's part `a` [N, last] held interleaved, in the file's order: [..., last]."""
    last, bb = a.shape[-1], _code_bytes(a)
    group, j = tokens // GROUP, tokens % GROUP
    if bb:
        return a.reshape(-1, last // bb, bb // 4, GROUP, 4)[group, :, :, j, :].reshape(*tokens.shape, last)
    return a.reshape(-1, last, GROUP)[group, :, j]


def interleave_params(params: dict, formats: dict[str, str], f) -> dict:
    """A params tree (its "params") with the block weights `interleaved` for `f` interleaved: the layers'
    stacks, and the embedding table or an untied output projection."""
    out = dict(params)
    for scope in ("layers", "embed", None):
        held = dict(params[scope]) if scope else out
        for name, fmt in formats.items():
            if name not in held:
                continue
            arrays = tuple(held[name + p] for p in parts(fmt))
            stack = arrays if scope == "layers" else tuple(a[None] for a in arrays)
            if interleaved(BlockWeight(fmt, stack, tuple(stack[0].shape[1:-1]), name=name), f):
                woven = interleave(stack)
                held.update(zip((name + p for p in parts(fmt)), woven if scope == "layers" else (a[0] for a in woven)))
        if scope:
            out[scope] = held
    return out


def dot(x, w: BlockWeight, f):
    """x [B, T, inputs...] . w -> [B, T, outputs...] in x's dtype, as `f` (a quant.Formulation) says for the
    rows (B * T): by jaxserve's kernel below `kernel_below_rows` (with `q8`, on activations quantized to
    `x_bits` where `w` is `interleaved`), else dequantized within the step to float32, or to bfloat16 from
    `bf16_from_rows` on (bfloat16 products, float32 sums), as the int8 formulations do."""
    rows = x.shape[0] * x.shape[1]
    xr = x.reshape(rows, -1)
    if f.kernel_below_rows is not None and rows < f.kernel_below_rows:
        stack = w.arrays if w.layer is not None else tuple(a[None] for a in w.arrays)
        stack = tuple(a.reshape(a.shape[0], -1, a.shape[-1]) for a in stack)
        # with q8 every row count takes the same loops: a float difference of one row's own loop would come
        # out of the next quantized activations' rounding larger (seeded samples of a request asked twice,
        # the second time from the prefix cache, differed)
        layer = 0 if w.layer is None else w.layer
        y = kernels.block_matmul(xr, w.fmt, *stack, layer=layer, x_bits=x_bits(w, f), invariant=f.q8, tiles=f.tiles)
        return y.reshape(*x.shape[:2], *w.outputs).astype(x.dtype)
    assert not interleaved(w, f), "quantized activations are the kernel's, at every row count"
    arrays = w.arrays if w.layer is None else tuple(a[w.layer] for a in w.arrays)
    arrays = tuple(a.reshape(-1, a.shape[-1]) for a in arrays)  # [N, ...]
    bf16 = f.bf16_from_rows is not None and rows >= f.bf16_from_rows
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    xr = xr.astype(dtype)

    def product(parts_):
        weights = dequantize(w.fmt, *parts_, xp=jnp).astype(dtype)  # [n, K]
        return jnp.einsum("rk,nk->rn", xr, weights, preferred_element_type=jnp.float32)

    n = arrays[0].shape[0]
    chunks = n // CHUNK if n > CHUNK and n % CHUNK == 0 else 1
    if chunks == 1:
        y = product(arrays)
    else:  # one dequantized chunk at a time: XLA would write the whole float copy first
        split = tuple(a.reshape(chunks, CHUNK, a.shape[-1]) for a in arrays)
        _, y = jax.lax.scan(lambda _, p: (None, product(p)), None, split)  # [chunks, rows, CHUNK]
        y = jnp.moveaxis(y, 0, 1).reshape(rows, n)
    return y.reshape(*x.shape[:2], *w.outputs).astype(x.dtype)
