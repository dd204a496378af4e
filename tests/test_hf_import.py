"""Hugging Face checkpoint directories against tests/reference/hf-tiny: HF transformers' float32 logits at
every position and 12 greedy tokens (llama, qwen2, qwen3, gemma3), tokenizer ids, and variants written here
(stored dtypes, shards, untied head, config spellings, Mistral, llama3 RoPE scaling, refusals)."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from converted import assert_streamed, streamed_conversion
from flax.traverse_util import flatten_dict
from safetensors import safe_open
from safetensors.numpy import save_file
from served import full_logits, greedy_decode

from jaxserve.checkpoint import convert_hf, ensure_checkpoint, load_checkpoint, load_model
from jaxserve.checkpoint.hf_import import open_hf, read_config, read_hf
from jaxserve.checkpoint.quantize import GROUPED_AXIS, quantize_array
from jaxserve.checkpoint.stream import collect, quantize_pieces
from jaxserve.device.runner import JaxRunner
from jaxserve.model.config import RopeScaling
from jaxserve.model.quant import group_size
from jaxserve.sharding import make_mesh
from jaxserve.tokenizer import SentencePieceTokenizer

TINY = Path(__file__).parent / "reference" / "hf-tiny"
FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]


def reference(family: str) -> dict:
    return json.loads((TINY / family / "reference.json").read_text())


def assert_logits_match(cfg, params, family):
    for p in reference(family)["prompts"]:
        ref = np.array(p["logits"])
        np.testing.assert_allclose(full_logits(cfg, params, p["ids"]), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def variant(tmp_path, family, config=None, dtype=None, shards=1, extra=None, drop=()) -> Path:
    """A copy of hf-tiny/FAMILY with config.json keys replaced (None deletes), tensors stored as `dtype`,
    split over `shards` files with an index, `extra` tensors added and `drop` removed."""
    out = tmp_path / family
    shutil.copytree(TINY / family, out, ignore=shutil.ignore_patterns("model.safetensors", "reference.json"))
    hf = json.loads((TINY / family / "config.json").read_text())
    for k, v in (config or {}).items():
        if v is None:
            hf.pop(k, None)
        else:
            hf[k] = v
    (out / "config.json").write_text(json.dumps(hf))
    with safe_open(TINY / family / "model.safetensors", framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.astype(dtype) if dtype else v) for k, v in {**tensors, **(extra or {})}.items() if k not in drop}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, out / "model.safetensors")
        return out
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k] for k in part}, out / file)
        weight_map.update({k: file for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_greedy_and_tokenizer_match_hf(family, tmp_path):
    model = load_checkpoint(convert_hf(TINY / family, tmp_path / family, progress=False), make_mesh(1, 1))
    ref = reference(family)
    assert_logits_match(model.cfg, model.params, family)
    for p in ref["prompts"]:
        assert model.tokenizer.encode(p["text"]) == p["ids"]
    # greedy through the served steps: every prompt in its own slot, decoded together
    prompts = [p["ids"] for p in ref["prompts"]]
    steps = len(ref["prompts"][0]["greedy_ids"])
    decoded = greedy_decode(JaxRunner(model, slots=len(prompts), cache_len=128, eos_id=None), prompts, steps)
    assert [tokens.tolist() for tokens, *_ in decoded] == [p["greedy_ids"] for p in ref["prompts"]]
    for case in ref["tokenize"]:
        assert model.tokenizer.encode(case["text"]) == case["ids"]


def test_gemma_tokenizer_model_matches_hf():
    tok = SentencePieceTokenizer.from_file(TINY / "gemma3" / "tokenizer.model", add_bos=True)
    for case in reference("gemma3")["tokenize"]:
        assert tok.encode(case["text"]) == case["ids"]
        assert tok.decode(case["ids"][1:]) == case["text"]


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=["bf16", "f16"])
def test_stored_dtypes_and_sharded_files(tmp_path, dtype):
    _, want, _ = read_hf(TINY / "llama", progress=False)
    cfg, got, _ = read_hf(variant(tmp_path, "llama", dtype=dtype, shards=3), progress=False)
    rounded = jax.tree.map(lambda w: np.asarray(np.asarray(w).astype(dtype), np.float32), want)
    jax.tree.map(np.testing.assert_array_equal, got, rounded)


def test_untied_output_head(tmp_path):
    with safe_open(TINY / "llama" / "model.safetensors", framework="numpy") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    path = variant(tmp_path, "llama", config={"tie_word_embeddings": False}, extra={"lm_head.weight": embedding})
    cfg, params, _ = read_hf(path, progress=False)
    assert not cfg.tie_embeddings and params["params"]["lm_head"].shape == (cfg.dim, cfg.vocab_size)
    assert_logits_match(cfg, params, "llama")


def test_both_config_spellings():
    gemma5 = json.loads((TINY / "gemma3" / "config.json").read_text())
    gemma4 = {k: v for k, v in gemma5.items() if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")}
    gemma4.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=3, rope_scaling=None)
    assert read_config(gemma4) == read_config(gemma5)
    llama4 = json.loads((TINY / "llama" / "config.json").read_text())
    llama5 = {**llama4, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}
    del llama5["rope_theta"]
    assert read_config(llama4) == read_config(llama5)


def test_mistral(tmp_path):
    path = variant(
        tmp_path,
        "llama",
        config={"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None},
    )
    cfg, params, _ = read_hf(path, progress=False)
    assert_logits_match(cfg, params, "llama")
    hf = {**json.loads((path / "config.json").read_text()), "sliding_window": 4}
    assert read_config(hf).local_layers == (0, 1, 2) and read_config(hf).sliding_window == 4


def test_llama3_rope_scaling():
    hf = {
        **json.loads((TINY / "llama" / "config.json").read_text()),
        "head_dim": 128,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    scaling = read_config(hf).rope_scaling
    assert scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    freqs = 500000.0 ** (-np.arange(0, 128, 2) / 128)

    def meta_reference(freq):  # Meta's llama3 apply_scaling, one frequency at a time
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            return freq
        if wavelen > 8192 / 1.0:
            return freq / 8.0
        smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
        return (1 - smooth) * freq / 8.0 + smooth * freq

    np.testing.assert_allclose(scaling.apply(freqs), [meta_reference(f) for f in freqs], rtol=1e-12)


def test_unsupported_inputs_are_refused_by_name(tmp_path):
    hf = json.loads((TINY / "llama" / "config.json").read_text())
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        read_config({**hf, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'"):
        read_config({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="unsupported activation 'gelu'"):
        read_config({**hf, "hidden_act": "gelu"})
    path = variant(tmp_path, "llama", extra={"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match="unsupported tensor 'model.layers.0.self_attn.o_proj.bias'"):
        read_hf(path, progress=False)
    path = variant(tmp_path / "b", "llama", drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ValueError, match="lacks tensors"):
        read_hf(path, progress=False)


def test_eos_list_from_generation_config(tmp_path):
    path = variant(tmp_path, "gemma3")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5], "bos_token_id": 2}))
    out = convert_hf(path, tmp_path / "ckpt", progress=False)
    tok = load_checkpoint(out, make_mesh(1, 1)).tokenizer
    assert tok.eos_id == 1 and tok.eos_ids == (1, 5) and tok.add_bos


def test_int8_gemma(tmp_path):
    """int8 works for the new weights: the quantized tiny Gemma stays close to HF's float32 logits."""
    model = load_checkpoint(
        convert_hf(TINY / "gemma3", tmp_path / "q", progress=False, quantize="int8"), make_mesh(1, 1)
    )
    assert model.params["params"]["layers"]["q"].dtype == np.int8
    for p in reference("gemma3")["prompts"]:
        ref = np.array(p["logits"])
        got = full_logits(model.cfg, model.params, p["ids"])
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_int8_piece_by_piece_is_int8_of_the_whole_leaves():
    """Quantizing each tensor as it streams gives what quantizing the stacked leaves would: groups never
    span layers, nor gate and up."""
    cfg, pieces, _ = open_hf(TINY / "gemma3", progress=False)
    q8 = dataclasses.replace(cfg, quant="int8")
    got = flatten_dict(collect(quantize_pieces(pieces, q8), q8)["params"])
    whole = flatten_dict(read_hf(TINY / "gemma3", progress=False)[1]["params"])
    for path, w in whole.items():
        if path[-1] in GROUPED_AXIS:
            a = GROUPED_AXIS[path[-1]]
            q, scale = quantize_array(w, a, group_size(q8, w.shape[a]))
            np.testing.assert_array_equal(got[path], q)
            np.testing.assert_array_equal(got[(*path[:-1], path[-1] + "_scale")], scale)


def test_convert_command_then_model_dir(tmp_path):
    root = tmp_path / "root"
    result = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli", "convert", str(TINY / "qwen3"), "--checkpoints", str(root)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    model = load_checkpoint(root / "qwen3", make_mesh(1, 1))
    assert_logits_match(model.cfg, model.params, "qwen3")
    # --model DIR: converted once into root/DIRNAME, then reused while it names the same source
    assert ensure_checkpoint(str(TINY / "qwen3"), root) == root / "qwen3"
    mtime = (root / "qwen3" / "config.json").stat().st_mtime
    model = load_model(str(TINY / "qwen3"), root, make_mesh(1, 1))
    assert model.name == "qwen3" and (root / "qwen3" / "config.json").stat().st_mtime == mtime


def test_conversion_streams_tensor_by_tensor(tmp_path):
    """Converting holds a few source tensors on the host at a time, never the parameter tree, nor even one
    stacked parameter: the peak of Python's allocations (NumPy's included, tracemalloc) during a conversion
    stays far under both. The model: hf-tiny/llama with 125 layers appended whose o_proj and down_proj are
    zero (each adds nothing to the residual), so the converted model must still give HF's logits."""
    with safe_open(TINY / "llama" / "model.safetensors", framework="numpy") as f:
        layer0 = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.0.")}
    extra = {
        k.replace(".0.", f".{i}.", 1): np.zeros_like(v) if "o_proj" in k or "down_proj" in k else v
        for i in range(3, 128)
        for k, v in layer0.items()
    }
    path = variant(tmp_path, "llama", config={"num_hidden_layers": 128}, extra=extra)
    mesh = make_mesh(1, 1)
    out, peak = streamed_conversion(convert_hf, path, tmp_path, mesh)
    model = load_checkpoint(out, mesh)
    assert_streamed(peak, model.params)
    assert_logits_match(model.cfg, model.params, "llama")


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_sharded_over_a_model_mesh(tmp_path, family):
    """Biases, q/k norms and sandwich norms carry logical axes: on a 2-way model mesh the logits agree."""
    model = load_checkpoint(convert_hf(TINY / family, tmp_path / family, progress=False), make_mesh(1, 2))
    assert len(model.params["params"]["layers"]["q"].sharding.device_set) == 2
    assert_logits_match(model.cfg, model.params, family)
