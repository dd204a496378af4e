"""Read a Hugging Face checkpoint directory: config.json, *.safetensors (one file or sharded through
model.safetensors.index.json), tokenizer.json or tokenizer.model, generation_config.json.

Supported: LlamaForCausalLM (with `llama3` or `linear` RoPE scaling), MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM; float32, bfloat16 and float16 tensors; both config
spellings (transformers 4.x `rope_theta` / `rope_scaling` / `sliding_window_pattern`, 5.x
`rope_parameters` / `layer_types`). Anything else — another architecture, an unknown tensor, a RoPE type, an
activation, a bias or soft-capping the model lacks — is refused naming it, never read into a wrong model.

Tensors are read one at a time (safetensors `safe_open`, memory-mapped) and handed on as pieces of
jaxserve's stacked parameters (stream.py), so converting holds one tensor on the host, not the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from jaxserve.checkpoint.stream import Piece, check_complete, collect, leaf_shapes
from jaxserve.model.config import ModelConfig, RopeScaling
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


def _target(name: str, cfg: ModelConfig):
    """HF tensor name -> (leaf path, index, HF value -> value in jaxserve's layout), or None if unknown."""
    D, N, K, H = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    norm = (lambda w: w + 1) if cfg.embed_scale else (lambda w: w)  # the Gemma family: (1 + w) norms
    transposed = lambda w: w.T
    parts = name.split(".")
    if name == "model.embed_tokens.weight":
        return ("embed", "embedding"), (), lambda w: w
    if name == "model.norm.weight":
        return ("final_norm", "scale"), (), norm
    if name == "lm_head.weight":
        return ("lm_head",), (), transposed
    if parts[:2] != ["model", "layers"] or len(parts) < 5 or not parts[2].isdigit():
        return None
    i, key = int(parts[2]), ".".join(parts[3:])
    if i >= cfg.n_layers:
        return None
    norms = GEMMA_NORMS if cfg.embed_scale else LLAMA_NORMS
    if key.endswith("layernorm.weight") and parts[3] in norms:
        return ("layers", norms[parts[3]], "scale"), (i,), norm
    table = {
        "self_attn.q_proj.weight": (("layers", "q"), lambda w: w.T.reshape(D, N, H)),
        "self_attn.k_proj.weight": (("layers", "k"), lambda w: w.T.reshape(D, K, H)),
        "self_attn.v_proj.weight": (("layers", "v"), lambda w: w.T.reshape(D, K, H)),
        "self_attn.o_proj.weight": (("layers", "o"), lambda w: w.T.reshape(N, H, D)),
        "self_attn.q_proj.bias": (("layers", "q_bias"), lambda w: w.reshape(N, H)),
        "self_attn.k_proj.bias": (("layers", "k_bias"), lambda w: w.reshape(K, H)),
        "self_attn.v_proj.bias": (("layers", "v_bias"), lambda w: w.reshape(K, H)),
        "self_attn.q_norm.weight": (("layers", "q_norm", "scale"), norm),
        "self_attn.k_norm.weight": (("layers", "k_norm", "scale"), norm),
        "mlp.down_proj.weight": (("layers", "down"), transposed),
    }
    if key in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):  # gate_up[layer, :, 0 or 1]
        return ("layers", "gate_up"), (i, None, 0 if key.startswith("mlp.gate") else 1), transposed
    if key not in table:
        return None
    path, transform = table[key]
    return path, (i,), transform


def open_params(directory: Path, cfg: ModelConfig, progress: bool = True) -> Iterator[Piece]:
    """The model's parameters as pieces (see stream.py), one safetensors tensor at a time in float32.
    Every tensor name is checked before any is read: an unknown one or a missing piece is refused here."""
    files = _tensor_files(directory)
    leaves = leaf_shapes(cfg)
    plan = {}
    for name, path in sorted(files.items(), key=lambda item: (str(item[1]), item[0])):
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # recomputed / the tied embedding (some checkpoints store both)
        target = _target(name, cfg)
        if target is None or target[0] not in leaves:
            raise ValueError(f"unsupported tensor {name!r} in {path.name}")
        plan[name] = target
    check_complete([(leaf, index) for leaf, index, _ in plan.values()], cfg, directory)
    return _read(files, plan, progress)


def _read(files: dict[str, Path], plan: dict, progress: bool) -> Iterator[Piece]:
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, framework="numpy")) for path in set(files.values())}
        for name, (leaf, index, transform) in tqdm(plan.items(), desc="reading", unit="tensor", disable=not progress):
            yield leaf, index, transform(np.asarray(handles[files[name]].get_tensor(name), np.float32))


def read_params(directory: Path, cfg: ModelConfig, progress: bool = True) -> dict:
    """The parameter tree ({'params': ...}) in float32 NumPy (whole: for tests and small models)."""
    return collect(open_params(directory, cfg, progress), cfg)


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


def open_hf(directory: Path, max_context: int | None = None, progress: bool = True):
    """(config, float32 parameter pieces, tokenizer) from a Hugging Face checkpoint directory."""
    directory = Path(directory)
    hf = _json(directory / "config.json")
    cfg = read_config(hf, max_context)
    return cfg, open_params(directory, cfg, progress), read_tokenizer(directory, hf)


def read_hf(directory: Path, max_context: int | None = None, progress: bool = True):
    """(config, float32 NumPy params, tokenizer) from a Hugging Face checkpoint directory."""
    cfg, pieces, tok = open_hf(directory, max_context, progress)
    return cfg, collect(pieces, cfg), tok
