"""Model hyperparameters: one frozen dataclass, serialisable to the checkpoint's config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Shapes use B slots, T tokens, S cache, D width, N/K heads, H head dim."""

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

    def __post_init__(self):
        assert self.n_heads % self.n_kv_heads == 0, "query heads must be a multiple of KV heads"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls(**json.loads(text))

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        return cls.from_json(Path(path).read_text())

    def num_params(self) -> int:
        L, D, N, K, H, F, V = (self.n_layers, self.dim, self.n_heads, self.n_kv_heads, self.head_dim,
                               self.mlp_dim, self.vocab_size)
        per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * D
        return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D
