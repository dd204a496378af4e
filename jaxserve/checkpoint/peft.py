"""Read a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`) into jaxserve's
weight layout, in float32 NumPy, for one base model.

What is read: `r`, `lora_alpha`, `use_rslora` (the scale is alpha / r, or alpha / sqrt(r) under rsLoRA,
folded into B here), and `target_modules` among the seven projections of a decoder layer (q/k/v/o_proj,
gate/up/down_proj), given as a list of names or as "all-linear", which PEFT expands to every linear layer
but the output head: for the decoders jaxserve serves, exactly those seven. Tensors may be float32,
bfloat16 or float16.

Anything that would change the adapter's results if it were ignored is refused, naming it: embedding or
lm_head targets, `modules_to_save`, DoRA, biases, `rank_pattern` / `alpha_pattern`, `layers_to_transform`,
`exclude_modules`, `fan_in_fan_out`, `target_modules` as a regex, a pickled `adapter_model.bin`, a tensor
that is not a targeted projection's `lora_A` / `lora_B`, a targeted projection missing in some layer, and
shapes that do not fit the base. (`base_model_name_or_path` is a hub id, not compared.)

Layout (see jaxserve.model.lora): per target, A [L, inputs..., r] and B [L, r, outputs...] with the
inputs and outputs shaped as the base kernel's (q: A [L, D, r], B [L, r, N, H]); gate_proj and up_proj
are the two halves of the base's gate_up: A [L, D, 2, r], B [L, 2, r, F], zero where one is not targeted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from jaxserve.model.config import ModelConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's wrapper around the base's own module names
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16", "float16")
# keys whose non-default value changes what the adapter computes, with that default
REFUSED = {
    "modules_to_save": None,
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "trainable_token_indices": None,
    "target_parameters": None,
}


class AdapterError(ValueError):
    """An adapter that cannot be served as it is; `param` names what to blame (the adapter's name)."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) (already folded into each B)
    targets: tuple[str, ...]  # PEFT module names, e.g. ("q_proj", "v_proj")
    weights: dict  # jaxserve target -> (A [L, inputs..., r], B [L, r, outputs...]) float32

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _dims(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """PEFT module -> (its input dims, its output dims) as jaxserve's kernel shapes them."""
    D, N, K, H, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    return {
        "q_proj": ((D,), (N, H)),
        "k_proj": ((D,), (K, H)),
        "v_proj": ((D,), (K, H)),
        "o_proj": ((N, H), (D,)),
        "gate_proj": ((D,), (F,)),
        "up_proj": ((D,), (F,)),
        "down_proj": ((F,), (D,)),
    }


def _refuse(name: str, why: str) -> AdapterError:
    return AdapterError(f"LoRA adapter {name!r}: {why}")


def read_config(directory: str | Path, name: str) -> dict:
    """adapter_config.json, checked: returns it with `target_modules` as a sorted list of PEFT module names."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise _refuse(name, f"{directory} has no {CONFIG}")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(name, f"peft_type {config['peft_type']!r} is not supported (only LORA)")
    for key, default in REFUSED.items():
        value = config.get(key, default)
        if value not in (default, None, {}, [], False):
            raise _refuse(name, f"{key}={value!r} is not supported")
    if config.get("bias", "none") != "none":
        raise _refuse(name, f"bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if targets == "all-linear":  # PEFT: every linear layer but the output head; here, the seven projections
        targets = list(PROJECTIONS)
    elif isinstance(targets, str):
        raise _refuse(name, f"target_modules as a regex ({targets!r}) is not supported: list the module names")
    if not targets:
        raise _refuse(name, "target_modules is empty")
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise _refuse(name, f"target_modules {unknown} are not supported (supported: {', '.join(PROJECTIONS)})")
    r = config.get("r")
    if not isinstance(r, int) or r <= 0:
        raise _refuse(name, f"r={r!r} must be a positive integer")
    return {**config, "target_modules": sorted(targets, key=PROJECTIONS.index)}


def _tensor_name(key: str) -> tuple[int, str, str] | None:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'q_proj', 'A'), else None."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight", key.removeprefix(PREFIX))
    return None if m is None else (int(m[1]), m[2], m[3])


def read_adapter(directory: str | Path, name: str, cfg: ModelConfig, max_rank: int | None = None) -> Adapter:
    """The adapter in `directory`, checked against the base `cfg` (and a rank of at most `max_rank`)."""
    directory = Path(directory)
    config = read_config(directory, name)
    r, targets = config["r"], config["target_modules"]
    if max_rank is not None and r > max_rank:
        raise _refuse(name, f"rank r={r} exceeds --max-lora-rank {max_rank}")
    if not (directory / WEIGHTS).is_file():
        bin_only = (directory / "adapter_model.bin").is_file()
        held = "only adapter_model.bin (pickled: convert it to safetensors)" if bin_only else f"no {WEIGHTS}"
        raise _refuse(name, f"{directory} holds {held}")
    alpha = float(config.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    dims, L = _dims(cfg), cfg.n_layers
    seen: dict[tuple[int, str, str], np.ndarray] = {}
    with safe_open(directory / WEIGHTS, framework="numpy") as f:
        for key in f.keys():
            parsed = _tensor_name(key)
            if parsed is None or parsed[1] not in targets or parsed[0] >= L:
                raise _refuse(name, f"tensor {key!r} is not a lora_A/lora_B of a targeted projection of the base")
            tensor = f.get_tensor(key)
            if tensor.dtype.name not in DTYPES:
                raise _refuse(name, f"tensor {key!r} is {tensor.dtype.name} (supported: {', '.join(DTYPES)})")
            layer, module, half = parsed
            inputs, outputs = dims[module]
            want = (r, math.prod(inputs)) if half == "A" else (math.prod(outputs), r)
            if tensor.shape != want:
                raise _refuse(name, f"tensor {key!r} has shape {tensor.shape}; the base and r={r} need {want}")
            seen[parsed] = np.asarray(tensor, np.float32)
    missing = [f"layer {i} {m} lora_{h}" for i in range(L) for m in targets for h in "AB" if (i, m, h) not in seen]
    if missing:
        raise _refuse(name, f"{len(missing)} targeted tensors are missing, e.g. {missing[0]}")
    weights = {}
    for module in targets:
        inputs, outputs = dims[module]
        a = np.stack([seen[i, module, "A"].T.reshape(*inputs, r) for i in range(L)])
        b = np.stack([scale * seen[i, module, "B"].T.reshape(r, *outputs) for i in range(L)])
        weights[module] = (a, b)
    return Adapter(name, str(directory), r, scale, tuple(targets), _jaxserve_targets(weights, cfg, r))


def _jaxserve_targets(weights: dict, cfg: ModelConfig, r: int) -> dict:
    """PEFT modules -> jaxserve's targets: gate_proj and up_proj as the halves of gate_up."""
    out = {m[0]: weights[m] for m in ("q_proj", "k_proj", "v_proj", "o_proj") if m in weights}
    if "down_proj" in weights:
        out["down"] = weights["down_proj"]
    if "gate_proj" in weights or "up_proj" in weights:
        L, D, F = cfg.n_layers, cfg.dim, cfg.mlp_dim
        a, b = np.zeros((L, D, 2, r), np.float32), np.zeros((L, 2, r, F), np.float32)
        for half, module in enumerate(("gate_proj", "up_proj")):
            if module in weights:
                a[:, :, half], b[:, half] = weights[module]
        out["gate_up"] = (a, b)
    return out
