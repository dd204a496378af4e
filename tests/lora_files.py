"""PEFT LoRA adapters written by the tests themselves (seeded random A and B, in PEFT's file layout), and
the reference they are checked against: the base weights merged with them, W + s * B @ A, in Hugging
Face's [out, in] convention turned into jaxserve's kernel layout here (independently of
jaxserve.checkpoint.peft)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def features(cfg, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection, as nn.Linear has them."""
    D, N, K, H, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    return {
        "q_proj": (D, N * H),
        "k_proj": (D, K * H),
        "v_proj": (D, K * H),
        "o_proj": (N * H, D),
        "gate_proj": (D, F),
        "up_proj": (D, F),
        "down_proj": (F, D),
    }[module]


def write_adapter(
    directory: Path,
    cfg,
    rank: int,
    seed: int,
    targets=ALL,
    alpha: float | None = None,
    rslora: bool = False,
    dtype=np.float32,
    std: float = 0.05,
    **config,
) -> Path:
    """An adapter directory: adapter_config.json and adapter_model.safetensors (A and B both random, so the
    update is not zero as a freshly initialised PEFT adapter's is). Extra `config` keys go into the json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(cfg.n_layers):
        for module in targets:
            fan_in, fan_out = features(cfg, module)
            where = "self_attn" if module in ATTN else "mlp"
            key = f"base_model.model.model.layers.{i}.{where}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) * std).astype(dtype)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * std).astype(dtype)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    body = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny/hub-id-not-compared",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": list(targets),
        "use_rslora": rslora,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "use_dora": False,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        **config,
    }
    (directory / "adapter_config.json").write_text(json.dumps(body))
    return directory


def merged(params, cfg, directory: Path):
    """`params` (float, jaxserve layout) with the adapter in `directory` merged in: W + s * B @ A."""
    from safetensors import safe_open

    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    s = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    layers = {k: np.array(v) for k, v in params["params"]["layers"].items() if not isinstance(v, dict)}
    D, N, K, H = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    with safe_open(Path(directory) / "adapter_model.safetensors", framework="numpy") as f:
        for i in range(cfg.n_layers):
            for module in ALL if config["target_modules"] == "all-linear" else config["target_modules"]:
                where = "self_attn" if module in ATTN else "mlp"
                key = f"base_model.model.model.layers.{i}.{where}.{module}"
                a = f.get_tensor(f"{key}.lora_A.weight").astype(np.float64)
                b = f.get_tensor(f"{key}.lora_B.weight").astype(np.float64)
                w = (s * b @ a).T  # [in, out]: jaxserve's kernels are x @ W
                if module == "q_proj":
                    layers["q"][i] += w.reshape(D, N, H)
                elif module in ("k_proj", "v_proj"):
                    layers[module[0]][i] += w.reshape(D, K, H)
                elif module == "o_proj":
                    layers["o"][i] += w.reshape(N, H, D)
                elif module in ("gate_proj", "up_proj"):
                    layers["gate_up"][i, :, 0 if module == "gate_proj" else 1] += w
                else:
                    layers["down"][i] += w
    out = jax.tree.map(lambda x: x, params)
    out["params"]["layers"] = {**params["params"]["layers"], **layers}
    return out
