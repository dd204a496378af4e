"""Read a Hugging Face checkpoint directory: config.json, *.safetensors (one file or sharded through
model.safetensors.index.json), tokenizer.json or tokenizer.model, generation_config.json.

Supported: LlamaForCausalLM (with `llama3` or `linear` RoPE scaling), MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM; float32, bfloat16 and float16 tensors; both config
spellings (transformers 4.x `rope_theta` / `rope_scaling` / `sliding_window_pattern`, 5.x
`rope_parameters` / `layer_types`). Anything else — another architecture, an unknown tensor, a RoPE type, an
activation, a bias or soft-capping the model lacks — is refused naming it, never read into a wrong model.

Tensors are read one at a time (safetensors `safe_open`, memory-mapped) into the preallocated stacked
float32 arrays of jaxserve's layout, so the host holds the model once plus one tensor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from jaxserve.model.config import ModelConfig, RopeScaling
from jaxserve.model.params import abstract_params
from jaxserve.tokenizer import BPETokenizer, SentencePieceTokenizer, Tokenizer

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
LLAMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
GEMMA_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attn_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
}


def is_hf_directory(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def _rope(params: dict, where: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from one RoPE parameter dict (4.x top-level keys or a 5.x rope_parameters entry)."""
    theta = float(params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported RoPE type {kind!r} in {where} (supported: default, linear, llama3)")


def _layer_types(hf: dict, family: str) -> list[str]:
    L = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    if family == "gemma3":
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(L)]
    if family == "mistral" and hf.get("sliding_window"):
        return ["sliding_attention"] * L
    return ["full_attention"] * L


def read_config(hf: dict, max_context: int | None = None) -> ModelConfig:
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    family = ARCHITECTURES[arch]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            raise ValueError(f"{arch}: {key}={hf[key]} is not supported")
    if hf.get("mlp_bias") or (family != "qwen2" and hf.get("attention_bias")):
        raise ValueError(f"{arch}: attention_bias/mlp_bias (biases on o_proj or the MLP) are not supported")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError(f"{arch}: use_sliding_window=true is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{arch}: unsupported activation {act!r} (supported: {', '.join(ACTIVATIONS)})")

    types = _layer_types(hf, family)
    if set(types) - {"full_attention", "sliding_attention"}:
        raise ValueError(f"{arch}: unsupported layer types {sorted(set(types))}")
    local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    rp = hf.get("rope_parameters")
    if rp and "full_attention" in rp:  # transformers 5: one entry per layer type
        theta, scaling = _rope(rp["full_attention"], "rope_parameters.full_attention")
        local_theta, local_scaling = _rope(
            rp.get("sliding_attention", rp["full_attention"]), "rope_parameters.sliding_attention"
        )
    else:
        theta, scaling = _rope(
            rp or {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})},
            "rope_parameters" if rp else "rope_scaling",
        )
        local_theta, local_scaling = float(hf.get("rope_local_base_freq", theta)), None
    if local and local_scaling is not None:
        raise ValueError(f"{arch}: RoPE scaling on sliding-window layers is not supported")

    n_heads = hf["num_attention_heads"]
    gemma = family == "gemma3"
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        mlp_dim=hf["intermediate_size"],
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        max_context=int(max_context or hf.get("max_position_embeddings", 2048)),
        qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "gemma3"),
        sandwich_norms=gemma,
        activation=ACTIVATIONS[act],
        embed_scale=gemma,
        query_scale=hf["query_pre_attn_scalar"] ** -0.5 if gemma else None,
        sliding_window=hf.get("sliding_window") if local else None,
        local_layers=local,
        rope_local_theta=local_theta if local and local_theta != theta else None,
        rope_scaling=scaling,
    )


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    path = directory / "model.safetensors"
    with safe_open(path, framework="numpy") as f:
        return {name: path for name in f.keys()}


def _place(name: str, w: np.ndarray, cfg: ModelConfig, gemma: bool):
    """HF tensor name and value -> (path in jaxserve's tree, layer index or None, value in jaxserve layout)."""
    D, N, K, H = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    parts = name.split(".")
    if name == "model.embed_tokens.weight":
        return ("embed", "embedding"), None, w
    if name == "model.norm.weight":
        return ("final_norm", "scale"), None, w + 1 if gemma else w
    if name == "lm_head.weight":
        return ("lm_head",), None, w.T
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        return None
    i, key = int(parts[2]), ".".join(parts[3:])
    norms = GEMMA_NORMS if gemma else LLAMA_NORMS
    if key.endswith("layernorm.weight") and parts[3] in norms:
        return ("layers", norms[parts[3]], "scale"), i, w + 1 if gemma else w
    table = {
        "self_attn.q_proj.weight": (("layers", "q"), lambda: w.T.reshape(D, N, H)),
        "self_attn.k_proj.weight": (("layers", "k"), lambda: w.T.reshape(D, K, H)),
        "self_attn.v_proj.weight": (("layers", "v"), lambda: w.T.reshape(D, K, H)),
        "self_attn.o_proj.weight": (("layers", "o"), lambda: w.T.reshape(N, H, D)),
        "self_attn.q_proj.bias": (("layers", "q_bias"), lambda: w.reshape(N, H)),
        "self_attn.k_proj.bias": (("layers", "k_bias"), lambda: w.reshape(K, H)),
        "self_attn.v_proj.bias": (("layers", "v_bias"), lambda: w.reshape(K, H)),
        "self_attn.q_norm.weight": (("layers", "q_norm", "scale"), lambda: w + 1 if gemma else w),
        "self_attn.k_norm.weight": (("layers", "k_norm", "scale"), lambda: w + 1 if gemma else w),
        "mlp.gate_proj.weight": (("layers", "gate_up", 0), lambda: w.T),
        "mlp.up_proj.weight": (("layers", "gate_up", 1), lambda: w.T),
        "mlp.down_proj.weight": (("layers", "down"), lambda: w.T),
    }
    if key not in table:
        return None
    path, value = table[key]
    return path, i, value()


def read_params(directory: Path, cfg: ModelConfig, progress: bool = True) -> dict:
    """The parameter tree ({'params': ...}) in float32 NumPy, filled tensor by tensor."""
    shapes, _ = abstract_params(cfg)
    params = {"params": _empty(shapes["params"])}
    filled: set[tuple] = set()  # (path in the tree, layer index or None)
    gemma = cfg.embed_scale  # the Gemma family: (1 + w) norms
    files = _tensor_files(directory)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    bar = tqdm(total=len(files), desc="reading", unit="tensor", disable=not progress)
    for path, names in by_file.items():
        with safe_open(path, framework="numpy") as f:
            for name in names:
                bar.update()
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings):
                    continue  # recomputed / the tied embedding (some checkpoints store both)
                placed = _place(name, np.asarray(f.get_tensor(name), np.float32), cfg, gemma)
                if placed is None:
                    raise ValueError(f"unsupported tensor {name!r} in {path.name}")
                key, layer, value = placed
                node = params["params"]
                for k in key[:-1]:
                    node = node[k]
                if key[-1] in (0, 1):  # gate_up[layer, :, 0 or 1]
                    node[layer, :, key[-1]] = value
                else:
                    node[key[-1]][... if layer is None else layer] = value
                filled.add((key, layer))
    bar.close()
    missing = [
        f"{'.'.join(map(str, key))}[{layer}]"
        for key, layer in _expected(params["params"], cfg)
        if (key, layer) not in filled
    ]
    if missing:
        raise ValueError(f"{directory} lacks tensors for {', '.join(missing[:5])}")
    return params


def _expected(tree: dict, cfg: ModelConfig, prefix=()):
    """Every (path, layer) read_params must fill: each layer of a stacked leaf, each half of gate_up."""
    for k, v in tree.items():
        key = (*prefix, k)
        if isinstance(v, dict):
            yield from _expected(v, cfg, key)
            continue
        layers = range(cfg.n_layers) if key[0] == "layers" else [None]
        parts = [(*key, 0), (*key, 1)] if k == "gate_up" else [key]
        yield from ((part, i) for part in parts for i in layers)


def _empty(tree):
    return {k: _empty(v) if isinstance(v, dict) else np.zeros(v.shape, np.float32) for k, v in tree.items()}


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_string(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer(directory: Path, hf: dict) -> Tokenizer:
    """tokenizer.json (HF `tokenizers`), else tokenizer.model (SentencePiece); EOS from generation_config.json
    (an id or a list: the tokenizer's own EOS stays the primary one, every listed id ends a generation)."""
    tc = _json(directory / "tokenizer_config.json")
    gen = _json(directory / "generation_config.json")
    gen_eos = gen.get("eos_token_id", hf.get("eos_token_id"))
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if (directory / "tokenizer.json").is_file():
        tok = BPETokenizer.from_file(
            directory / "tokenizer.json",
            bos=_token_string(tc.get("bos_token")),
            eos=_token_string(tc.get("eos_token")),
            add_bos=tc.get("add_bos_token"),
        )
    elif (directory / "tokenizer.model").is_file():
        tok = SentencePieceTokenizer.from_file(directory / "tokenizer.model", add_bos=tc.get("add_bos_token", True))
    else:
        raise ValueError(f"{directory} has neither tokenizer.json nor tokenizer.model")
    if tok.eos_id is None and gen_eos:
        tok.eos_id = gen_eos[0]
    tok.extra_eos_ids = tuple(gen_eos)
    tok.chat_template = read_chat_template(directory)
    return tok


def read_chat_template(directory: Path) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's `chat_template` (a string, or a list of named
    templates of which the one named "default" is the chat template)."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    template = _json(directory / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def read_hf(directory: Path, max_context: int | None = None, progress: bool = True):
    """(config, float32 NumPy params, tokenizer) from a Hugging Face checkpoint directory."""
    directory = Path(directory)
    hf = _json(directory / "config.json")
    cfg = read_config(hf, max_context)
    return cfg, read_params(directory, cfg, progress), read_tokenizer(directory, hf)
