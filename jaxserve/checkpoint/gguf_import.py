"""Read a `llama` or `gemma3` architecture GGUF file: hyperparameters, dequantized weights, the tokenizer.

Weights come one tensor at a time, as pieces (stream.py) of jaxserve's parameter layout (kernels [in, out],
layers stacked on a leading axis). For `llama`, llama.cpp stores Q and K permuted for its pairwise RoPE; we
undo that so the model uses the rotate-half layout of the original checkpoint. `gemma3` files keep HF's layout (no
permutation) and store norm weights with Gemma's `1 +` already added, which is jaxserve's convention too.
Tensor types: those in QUANT_TYPES (each tested against files gguf-py writes); any other is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from jaxserve.checkpoint.stream import Piece, check_complete, collect, leaf_shapes
from jaxserve.model.config import ModelConfig, RopeScaling
from jaxserve.tokenizer import BPETokenizer, SentencePieceTokenizer, Tokenizer

log = logging.getLogger(__name__)

# GGUF tensor name (per layer) -> (our name, number of heads to reshape the output axis into, or None)
_LAYER_TENSORS = {
    "attn_norm": "attn_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
    "post_attention_norm": "post_attn_norm",
    "post_ffw_norm": "post_mlp_norm",
}
_NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")

T = gguf.GGMLQuantizationType
QUANT_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
GEMMA3_GLOBAL_EVERY = 6  # llama.cpp's fixed pattern for gemma3 files: layers 5, 11, 17, ... are global
GEMMA3_LOCAL_THETA = 10000.0  # llama.cpp's fixed RoPE base of gemma3's local layers
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+: llama.cpp divides RoPE frequency i by entry i (read into the config)


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader: gguf.GGUFReader, max_context: int | None = None) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "gemma3"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}: jaxserve imports 'llama' and 'gemma3' models")
    p = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    dim, n_heads = int(p("embedding_length")), int(p("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = p("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    cfg = ModelConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(p("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(p("attention.head_count_kv", n_heads)),
        head_dim=int(p("attention.key_length", dim // n_heads)),
        mlp_dim=int(p("feed_forward_length")),
        rope_theta=float(p("rope.freq_base", 10000.0)),
        norm_eps=float(p("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        max_context=int(max_context or p("context_length", 2048)),
        rope_scaling=_rope_scaling(reader, arch),
    )
    if arch == "gemma3":
        cfg = dataclasses.replace(
            cfg,
            qk_norm=True,
            sandwich_norms=True,
            activation="gelu_tanh",
            embed_scale=True,
            sliding_window=int(p("attention.sliding_window")),
            rope_local_theta=GEMMA3_LOCAL_THETA,
            local_layers=tuple(i for i in range(cfg.n_layers) if (i + 1) % GEMMA3_GLOBAL_EVERY),
            # query_pre_attn_scalar is not in the file: llama.cpp takes head_dim, but dim / heads for the
            # 27B model (which it recognises by its 62 layers)
            query_scale=(dim / n_heads) ** -0.5 if cfg.n_layers == 62 else None,
        )
    if cfg.rope_scaling and cfg.rope_scaling.kind == "divisors" and len(cfg.rope_scaling.divisors) != cfg.head_dim // 2:
        raise ValueError(f"GGUF {ROPE_FREQS} has {len(cfg.rope_scaling.divisors)} entries, not head_dim/2")
    return cfg


def _rope_scaling(reader: gguf.GGUFReader, arch: str) -> RopeScaling | None:
    """`{arch}.rope.scaling.type` linear, or a llama file's rope_freqs tensor (what llama.cpp's converter
    writes for Llama 3.1+'s llama3 scaling, whose parameters the file does not keep): its entries divide
    the frequencies exactly as llama.cpp does. Any other scaling is refused naming it."""
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None and arch != "llama":
        raise ValueError(f"unexpected GGUF tensor {ROPE_FREQS!r} in a {arch!r} file")
    if kind not in ("none", "linear"):
        raise ValueError(f"unsupported GGUF RoPE scaling {kind!r} (supported: none, linear, and {ROPE_FREQS})")
    if kind == "linear" and freqs is not None:
        raise ValueError(f"GGUF file has both linear RoPE scaling and {ROPE_FREQS}; jaxserve applies one")
    if kind == "linear":
        return RopeScaling("linear", float(_field(reader, f"{arch}.rope.scaling.factor")))
    if freqs is not None:
        return RopeScaling("divisors", divisors=tuple(dequantize(freqs).reshape(-1).tolist()))
    return None


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: w [heads*H, D] with pairs (2i, 2i+1) back to halves (i, i+H/2)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def check_type(tensor) -> None:
    if tensor.tensor_type not in QUANT_TYPES:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which jaxserve does not "
            f"import (supported: {', '.join(t.name for t in QUANT_TYPES)})"
        )


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in NumPy (torch) order: [out, in] for matrices."""
    check_type(tensor)
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def _target(name: str, cfg: ModelConfig):
    """GGUF tensor name -> (leaf path, index, value in NumPy order -> value in jaxserve's layout), or None."""
    D, N, K, H = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    permuted = not cfg.qk_norm  # llama.cpp permutes Q/K of 'llama' files only
    transposed = lambda w: w.T
    if name == "token_embd.weight":
        return ("embed", "embedding"), (), lambda w: w
    if name == "output_norm.weight":
        return ("final_norm", "scale"), (), lambda w: w
    if name == "output.weight":
        return ("lm_head",), (), transposed
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit() or int(parts[1]) >= cfg.n_layers:
        return None
    i, ours = int(parts[1]), _LAYER_TENSORS.get(parts[2])
    if ours in _NORMS:
        return ("layers", ours, "scale"), (i,), lambda w: w
    if ours in ("gate", "up"):
        return ("layers", "gate_up"), (i, None, 0 if ours == "gate" else 1), transposed
    table = {
        "q": lambda w: (unpermute_rope(w, N) if permuted else w).T.reshape(D, N, H),
        "k": lambda w: (unpermute_rope(w, K) if permuted else w).T.reshape(D, K, H),
        "v": lambda w: w.T.reshape(D, K, H),
        "o": lambda w: w.T.reshape(N, H, D),
        "down": transposed,
    }
    return (("layers", ours), (i,), table[ours]) if ours in table else None


def open_params(reader: gguf.GGUFReader, cfg: ModelConfig, progress: bool = True) -> Iterator[Piece]:
    """The model's parameters as pieces (see stream.py), one tensor dequantized to float32 at a time.
    Every tensor name and type is checked before any is read: an unknown one or a missing piece is refused."""
    leaves = leaf_shapes(cfg)
    plan = []
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # read into the config
        target = _target(t.name, cfg)
        if target is None or target[0] not in leaves:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        check_type(t)
        plan.append((t, target))
    check_complete([(leaf, index) for _, (leaf, index, _) in plan], cfg, "GGUF file")
    return (
        (leaf, index, transform(dequantize(t)))
        for t, (leaf, index, transform) in tqdm(plan, desc="dequantizing", unit="tensor", disable=not progress)
    )


def read_params(reader: gguf.GGUFReader, cfg: ModelConfig, progress: bool = True) -> dict:
    """The parameter tree ({'params': ...}) in float32 NumPy (whole: for tests and small models)."""
    return collect(open_params(reader, cfg, progress), cfg)


def read_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    tok = _read_vocabulary(reader)
    tok.chat_template = read_chat_template(reader)
    return tok


def read_chat_template(reader: gguf.GGUFReader) -> str | None:
    """The file's `tokenizer.chat_template`, if it has one."""
    template = _field(reader, "tokenizer.chat_template")
    return str(template) if template else None


def _read_vocabulary(reader: gguf.GGUFReader) -> Tokenizer:
    kind = _field(reader, "tokenizer.ggml.model")
    if kind == "llama":  # SentencePiece: the model rebuilt from pieces, scores and piece types
        return SentencePieceTokenizer.from_vocab(
            tokens=list(_field(reader, "tokenizer.ggml.tokens")),
            scores=[float(x) for x in _field(reader, "tokenizer.ggml.scores")],
            token_types=[int(x) for x in _field(reader, "tokenizer.ggml.token_type")],
            bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            unk_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
            pad_id=_field(reader, "tokenizer.ggml.padding_token_id"),
            add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
        )
    if kind != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer {kind!r}: jaxserve builds byte-level BPE ('gpt2') and SentencePiece ('llama')"
        )
    return BPETokenizer.from_vocab(
        tokens=list(_field(reader, "tokenizer.ggml.tokens")),
        token_types=[int(x) for x in _field(reader, "tokenizer.ggml.token_type")],
        merges=list(_field(reader, "tokenizer.ggml.merges") or []),
        pre=_field(reader, "tokenizer.ggml.pre", "default"),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def open_gguf(path: Path, max_context: int | None = None, progress: bool = True):
    """(config, float32 parameter pieces, tokenizer) from a GGUF file (memory-mapped)."""
    reader = gguf.GGUFReader(str(path))
    cfg = read_config(reader, max_context)
    return cfg, open_params(reader, cfg, progress), read_tokenizer(reader)


def read_gguf(path: Path, max_context: int | None = None, progress: bool = True):
    """(config, float32 NumPy params, tokenizer) from a GGUF file."""
    cfg, pieces, tok = open_gguf(path, max_context, progress)
    return cfg, collect(pieces, cfg), tok
