"""Model hyperparameters: one frozen dataclass, serialisable to the checkpoint's config.json.

One decoder serves every family; the switches below default to a Llama, so a config.json written before a
switch existed still loads as the model it was. Norm weights are always stored as the factor the
normalised activations are multiplied by: Gemma's `(1 + w)` is added up on import, never in the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

ACTIVATIONS = ("silu", "gelu_tanh")
KV_DTYPES = ("float32", "bfloat16")  # what the KV page pool may hold (ModelConfig.kv_dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rescaling of the RoPE frequencies: "linear" (all divided by `factor`), "llama3" (Llama 3.1+:
    long wavelengths divided by `factor`, short ones kept, a smooth blend between) or "divisors" (each
    frequency divided by its own entry of `divisors`, as llama.cpp applies a GGUF's `rope_freqs.weight`)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192
    divisors: tuple[float, ...] = ()  # [H/2], for "divisors"

    def __post_init__(self):
        assert self.kind in ("linear", "llama3", "divisors"), self.kind
        object.__setattr__(self, "divisors", tuple(float(x) for x in self.divisors))  # a list from JSON

    def apply(self, inv_freq: np.ndarray) -> np.ndarray:
        """Rescaled inverse frequencies [H/2] (constants, computed once in NumPy)."""
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "divisors":
            assert len(self.divisors) == len(inv_freq), (len(self.divisors), len(inv_freq))
            return inv_freq / np.asarray(self.divisors, np.float64)
        low_wavelen = self.original_context / self.low_freq_factor
        high_wavelen = self.original_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (self.original_context / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        return np.where(
            wavelen > low_wavelen, inv_freq / self.factor, np.where(wavelen < high_wavelen, inv_freq, blended)
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder of the Llama / Mistral / Qwen 2-3 / Gemma 3 families. Shapes use B slots, T tokens, S cache,
    D width, N/K heads, H head dim (not necessarily D / N), F MLP width."""

    vocab_size: int
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    mlp_dim: int  # F
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_context: int = 2048
    dtype: str = "float32"  # weights and activations
    quant: str | None = None  # "int8": matmul weights int8, one float32 scale per group of input weights
    quant_group: int = 64  # input weights sharing one int8 scale (per output channel)
    # quant "blocks": each matmul weight in a GGUF block format (jaxserve.model.blocks), by name: ("q", "q4_1"), ...
    block_formats: tuple[tuple[str, str], ...] = ()
    # How attention computes, a serving choice never saved with the checkpoint (see
    # jaxserve.model.attention_kernels): "plain" (jnp, any backend), "cpu_kernel" (jaxserve's C++ kernel over
    # the plain pool), "tpu_kernel" or "gpu_kernel" (a Pallas kernel). Unlike quant.Formulation it lives
    # here because it decides the KV pool's layout, which the decode state declares from the config
    # (kv_cache_for).
    attention: str = "plain"
    # The KV page pool's dtype, also a serving choice never saved (None: `dtype`, the activations'). Every
    # pool layout declares its arrays from `cache_dtype`, and attention reads the pages upcast to the wider
    # of the two, so float32 activations over a bfloat16 pool attend in float32 over half the bytes.
    kv_dtype: str | None = None
    # family switches (defaults: Llama)
    qkv_bias: bool = False  # Qwen2: biases on the q, k and v projections
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE
    sandwich_norms: bool = False  # Gemma 3: RMSNorm also on the attention and MLP outputs, before each residual
    activation: str = "silu"  # of the gated MLP: "silu", or "gelu_tanh" (Gemma)
    embed_scale: bool = False  # Gemma: token embeddings times sqrt(dim)
    query_scale: float | None = None  # multiplies q.k; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    sliding_window: int | None = None  # a local layer's query sees keys at positions > its own - sliding_window
    local_layers: tuple[int, ...] = ()  # the layers with the sliding window (Gemma 3: five of every six)
    rope_local_theta: float | None = None  # RoPE base of the local layers (unscaled); None: as the global ones
    rope_scaling: RopeScaling | None = None  # of the global layers' RoPE frequencies

    def __post_init__(self):
        assert self.n_heads % self.n_kv_heads == 0, "query heads must be a multiple of KV heads"
        assert self.activation in ACTIVATIONS, self.activation
        assert not self.local_layers or self.sliding_window, "local layers need a sliding window"
        assert all(0 <= i < self.n_layers for i in self.local_layers), self.local_layers
        assert self.kv_dtype is None or self.kv_dtype in KV_DTYPES, self.kv_dtype

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        del data["attention"], data["kv_dtype"]  # chosen where the model is served
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        data["local_layers"] = tuple(data.get("local_layers", ()))
        data["block_formats"] = tuple(tuple(f) for f in data.get("block_formats", ()))
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        return cls.from_json(Path(path).read_text())

    def block_format(self, name: str) -> str | None:
        """The GGUF block format of matmul weight `name` (quant "blocks"), or None."""
        return dict(self.block_formats).get(name)

    @property
    def cache_dtype(self) -> str:
        """The KV page pool's dtype: kv_dtype, else the activations' dtype."""
        return self.kv_dtype or self.dtype

    def with_kv_dtype(self, choice: str) -> ModelConfig:
        """This config with its KV pool in `choice` ("auto": the activations' dtype, as before the choice
        existed; a choice equal to it is the same config, so its compiled steps are the same too)."""
        assert choice == "auto" or choice in KV_DTYPES, choice
        return dataclasses.replace(self, kv_dtype=None if choice in ("auto", self.dtype) else choice)

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5 if self.query_scale is None else self.query_scale

    def layer_is_local(self) -> tuple[bool, ...]:
        return tuple(i in self.local_layers for i in range(self.n_layers))

    def num_params(self) -> int:
        L, D, N, K, H, F, V = (
            self.n_layers,
            self.dim,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.mlp_dim,
            self.vocab_size,
        )
        norms = (4 if self.sandwich_norms else 2) * D + (2 * H if self.qk_norm else 0)
        bias = (N + 2 * K) * H if self.qkv_bias else 0
        per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F + norms + bias
        return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D
