"""int8 weights in the model: how a quantized weight is declared, which weights are int8, and how a matmul
on one computes. The model calls `weight` and `dot`; everything the int8 formulations need (jaxserve's own
kernel and its packed layout, bfloat16 or float32 widening by the rows a matmul carries) stays here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxserve import kernels
from jaxserve.model import blocks
from jaxserve.model.config import ModelConfig

QUANTIZED = ("int8", "blocks")  # the weights whose matmuls have formulations (jaxserve.device.formulation)
EVERY_ROW = 1 << 30  # kernel_below_rows of a kernel at every row count


@dataclasses.dataclass(frozen=True)
class Formulation:
    """How int8 weight matmuls compute, by the rows (B * T) a matmul carries: a serving choice made on the
    machine (jaxserve.device.formulation), static in the jitted steps, never saved with a checkpoint. Fewer
    than kernel_below_rows run jaxserve's own int8 kernel (jaxserve.kernels; the layers' int8 weights are
    then held packed for it); at least bf16_from_rows round the dequantized weights and the activations to
    bfloat16 and accumulate in float32; the rest widen the weights to float32. None: no kernel / no
    bfloat16."""

    kernel_below_rows: int | None = None
    bf16_from_rows: int | None = None
    # GGUF block weights: the kernel multiplies (every row count) on activations quantized to 8 or 16 bits a
    # run of 16 inputs (integer dot products: AVX512-VNNI, blocks.x_bits), weights interleaved for it
    q8: bool = False
    # and with q8, 16 rows at a time on AMX tiles (to the same bits; jaxserve.kernels.tiles) where `auto`
    # measured them faster
    tiles: bool = False

    def describe(self, cfg: ModelConfig) -> str:
        """The weight matmuls' arithmetic in a word, as the startup log and /metrics name it: float weights
        compute in their own dtype; int8 in "kernel", "f32" and "bf16" by rows, e.g. "kernel<8<=f32<32<=bf16"
        (the kernel below 8 rows, bfloat16 from 32 rows on, float32 between)."""
        if cfg.quant not in QUANTIZED:
            return cfg.dtype
        kernel, bf16 = self.kernel_below_rows or 1, self.bf16_from_rows
        q8 = ("(q8, tiles)" if self.tiles else "(q8)") if self.q8 else ""
        if kernel >= EVERY_ROW:
            return "kernel" + q8
        text = f"kernel{q8}<{kernel}<=" if kernel > 1 else ""
        if bf16 is None:
            return text + "f32"
        return text + (f"f32<{bf16}<=bf16" if bf16 > kernel else "bf16")


def group_size(cfg: ModelConfig, n: int) -> int:
    """Input weights per int8 scale along an input axis of length n: cfg.quant_group, or the whole axis
    where the group does not divide it."""
    return cfg.quant_group if n % cfg.quant_group == 0 else n


def weight(module: nn.Module, cfg: ModelConfig, name: str, shape, axes, a: int, init=None):
    """A matmul weight: (kernel, None) in the model's dtype, or with cfg.quant == "int8" an int8 kernel and a
    float32 scale per output channel and group of input weights along input axis `a` (the scale has the
    kernel's rank and axes; axis `a` shrinks by the group); with cfg.quant == "blocks" a blocks.BlockWeight."""
    if cfg.quant == "blocks":
        return blocks.declare(module, cfg.block_format(name), name, shape, axes, a)
    param = lambda name, shape, init, dtype: module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)
    if cfg.quant == "int8":
        kernel = param(name, shape, nn.initializers.zeros, jnp.int8)
        scale_shape = (*shape[:a], shape[a] // group_size(cfg, shape[a]), *shape[a + 1 :])
        return kernel, param(name + "_scale", scale_shape, nn.initializers.ones, jnp.float32)
    return param(name, shape, init or nn.initializers.normal(0.02), jnp.dtype(cfg.dtype)), None


def int8_names(scope) -> list[str]:
    """The int8 weights of one scope of the parameters (a kernel `name` beside its `name_scale`): the one
    walk of which weights are int8."""
    return sorted(n for n in scope if n + "_scale" in scope)


def int8_scopes(params):
    """(scope, leading axes) of each scope holding the matmuls' int8 weights: the layers' (stacked: one leading
    axis) and the top level's (an untied output projection; the tied embedding has a scope of its own)."""
    return ((params["params"]["layers"], 1), (params["params"], 0))


def grouped_axis(kernel_shape, scale_shape) -> int:
    """The input axis along which an int8 kernel's scales are grouped: the one where the scale is shorter,
    the last of the inputs (a kernel's first grouped_axis + 1 axes are its inputs)."""
    return next(i for i, (n, m) in enumerate(zip(kernel_shape, scale_shape)) if n != m)


def dequantize(kernel, scale):
    """int8 kernel * its group scales -> float32 weights. The grouped axis is the one where the scale is
    shorter. The weights stay int8 at rest; inside the jitted step XLA:CPU writes this float32 copy of each
    matrix just before its matmul (most of a one-slot decode step's time: see the int8 commits'
    measurements), and per-group scales cost no more there than per-channel ones."""
    a = grouped_axis(kernel.shape, scale.shape)
    groups = scale.shape[a]
    split = (*kernel.shape[:a], groups, kernel.shape[a] // groups, *kernel.shape[a + 1 :])
    w = kernel.astype(jnp.float32).reshape(split) * jnp.expand_dims(scale, a + 1)
    return w.reshape(kernel.shape)


def dot(spec: str, x, weight, f: Formulation | None = None):
    """einsum(spec, x [B, T, inputs...], kernel [inputs..., outputs...]) for `weight` (kernel, scale), or
    (kernels, scales, layer) for one layer of weights stacked over the layers (for jaxserve's kernel,
    which reads the layer in place: a custom call's operand sliced out of the stack would be a copy of
    it every step, as costly as the matmul). An int8 kernel is computed as `f` says for the rows it carries
    (B * T, known when tracing): by jaxserve's own kernel from its packed layout (jaxserve.kernels), or
    dequantized within the jitted step to float32, or rounded to bfloat16 once after the float32 dequantization (one
    rounding of each weight, not two) and multiplied with bfloat16 activations, accumulating in float32.
    Which is fastest depends on the CPU and the rows (jaxserve.device.formulation measures it); float
    weights always compute in their own dtype. GGUF block weights: see blocks.dot."""
    if isinstance(weight, blocks.BlockWeight):
        return blocks.dot(x, weight, f or Formulation())
    kernel, scale, *layer = weight
    if scale is None:
        return jnp.einsum(spec, x, kernel)
    rows, contracted = x.shape[0] * x.shape[1], x.ndim - 2
    held_packed = f is not None and f.kernel_below_rows is not None
    if held_packed and rows < f.kernel_below_rows:  # the kernel reads one layer of a stack (a lone weight: of one)
        stack = (kernel, scale) if layer else (kernel[None], scale[None])
        y = kernels.int8_matmul(x.reshape(rows, -1), *stack, contracted, layer[0] if layer else 0)
        return y.reshape(*x.shape[:2], *stack[0].shape[1 + contracted :]).astype(x.dtype)
    if layer:
        kernel, scale = kernel[layer[0]], scale[layer[0]]  # a slice XLA fuses into the dequantization
    if held_packed:
        kernel, scale = kernels.unpack(kernel, contracted), kernels.unpack(scale, contracted)
    if f is not None and f.bf16_from_rows is not None and rows >= f.bf16_from_rows:
        w = dequantize(kernel, scale).astype(jnp.bfloat16)
        return jnp.einsum(spec, x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum(spec, x.astype(jnp.float32), dequantize(kernel, scale)).astype(x.dtype)


def packed(params, cfg: ModelConfig):
    """The int8 weights that `dot` takes, in the layout jaxserve's kernel reads (jaxserve.kernels.pack):
    the layers' (stacked over the layers' axis) and an untied output projection's. The tied embedding is
    not among them: its kernel reads it as it is."""
    assert cfg.quant == "int8", cfg.quant

    def pack(kernel, scale, lead: int):
        contracted = grouped_axis(kernel.shape[lead:], scale.shape[lead:]) + 1
        one = lambda a: kernels.pack(a, contracted)
        fn = jax.vmap(one) if lead else one
        return fn(kernel), fn(scale)

    tree = jax.tree_util.tree_map(lambda a: a, params)  # a copy of the containers; arrays are replaced below
    for scope, lead in int8_scopes(tree):
        for name in int8_names(scope):
            scope[name], scope[name + "_scale"] = pack(scope[name], scope[name + "_scale"], lead)
    return tree


VOCAB_BLOCK = 3072  # rows of the int8 output projection widened at once


def tied_logits(x, table, scale, f: Formulation):
    """x [B, T, D] . the int8 embedding table [V, D]^T -> [B, T, V]: by jaxserve's kernel for the rows it
    serves, else by XLA a vocabulary block at a time (one dot over the whole table would widen all of it in
    memory first, far slower than float32; a scan widens one cache-sized block at a time)."""
    rows = x.shape[0] * x.shape[1]
    if f.kernel_below_rows is not None and rows < f.kernel_below_rows:
        y = kernels.int8_matmul(x.reshape(rows, -1), table[None], scale[None], layout="nk")
        return y.reshape(*x.shape[:2], -1)
    V, D = table.shape
    blocks = max(1, V // VOCAB_BLOCK)
    while V % blocks:
        blocks -= 1
    plain = dataclasses.replace(f, kernel_below_rows=None)  # the table is never packed
    block = lambda _, w: (None, dot("btd,vd->btv", x, w, plain))
    _, logits = jax.lax.scan(
        block, None, (table.reshape(blocks, V // blocks, D), scale.reshape(blocks, V // blocks, -1))
    )
    return jnp.moveaxis(logits, 0, 2).reshape(*x.shape[:2], V)  # [blocks, B, T, V/blocks] -> [B, T, V]
