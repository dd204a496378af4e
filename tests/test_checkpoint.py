"""GGUF import on synthetic files written by the `gguf` package's own writer, and orbax round-trips."""

import dataclasses
import math
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest
from converted import assert_streamed, streamed_conversion
from served import full_logits

from jaxserve.checkpoint import convert_gguf, load_checkpoint
from jaxserve.checkpoint.gguf_import import dequantize, read_gguf
from jaxserve.checkpoint.store import is_checkpoint
from jaxserve.model import ModelConfig, init_params
from jaxserve.model.config import RopeScaling
from jaxserve.sharding import make_mesh

T = gguf.GGMLQuantizationType
# Row length 256 so every K-quant block fits; 8 query heads and 2 KV heads of 32.
# norm_eps is exact in float32, as GGUF stores it.
CFG = ModelConfig(
    vocab_size=300,
    dim=256,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    head_dim=32,
    mlp_dim=512,
    rope_theta=50000.0,
    norm_eps=2.0**-20,
    tie_embeddings=False,
    max_context=128,
)
# K-quant formats the gguf package can read but not write: byte size of a 256-value block, offsets of f16 scales
K_QUANTS = {T.Q4_K: (144, (0, 2)), T.Q5_K: (176, (0, 2)), T.Q6_K: (210, (208,))}


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to HF's Q/K weights [heads*H, D] for its pairwise RoPE."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_quant(rows, cols, qtype, rng):
    """Random K-quant blocks with small finite f16 scales: [rows, bytes] as the writer expects."""
    block, scale_offsets = K_QUANTS[qtype]
    raw = rng.integers(0, 256, (rows, cols // 256, block), dtype=np.uint8)
    for off in scale_offsets:
        raw[..., off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path, params, qtype, rng, extra=None, rope_scaling=None, cfg=CFG):
    """Write `params` (jaxserve layout) as llama.cpp would: [out, in] matrices, Q/K permuted; `extra`
    tensors added as they are, `rope_scaling` (type, factor) in the metadata; `cfg` the model's shape.

    Matrices are stored as `qtype`. Returns the float values the file really holds in jaxserve layout
    (after quantization), which import must reproduce."""
    p = {k: np.asarray(v) for k, v in params["params"]["layers"].items() if not isinstance(v, dict)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_context)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    tokens = [bytes([b]).decode("latin-1") for b in range(256)]
    tokens = [chr(0x100 + i) if not (t.isprintable() and t != " ") else t for i, t in enumerate(tokens)]
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - 257)] + ["<|end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (cfg.vocab_size - 1) + [3])
    w.add_token_merges([])
    w.add_eos_token_id(cfg.vocab_size - 1)
    if rope_scaling:
        w.add_rope_scaling_type(rope_scaling[0])
        w.add_rope_scaling_factor(rope_scaling[1])
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)

    held = {}

    def put(name, matrix_out_in, key=None, unpermute_heads=None):
        if qtype in K_QUANTS:
            raw = random_k_quant(*matrix_out_in.shape, qtype, rng)
        else:
            raw = gguf.quants.quantize(matrix_out_in.astype(np.float32), qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
        stored = gguf.quants.dequantize(raw, qtype).reshape(matrix_out_in.shape)
        if unpermute_heads:  # the value jaxserve must see is the un-permuted one
            n = unpermute_heads
            stored = stored.reshape(n, stored.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(stored.shape)
        if key:
            held.setdefault(key, []).append(stored)

    D, N, K, H = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    w.add_tensor("token_embd.weight", np.asarray(params["params"]["embed"]["embedding"], np.float32))
    w.add_tensor("output_norm.weight", np.asarray(params["params"]["final_norm"]["scale"], np.float32))
    put("output.weight", np.asarray(params["params"]["lm_head"]).T, "lm_head")
    for i in range(cfg.n_layers):
        lp = params["params"]["layers"]
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.asarray(lp["attn_norm"]["scale"][i], np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.asarray(lp["mlp_norm"]["scale"][i], np.float32))
        put(f"blk.{i}.attn_q.weight", llama_cpp_permute(p["q"][i].reshape(D, N * H).T, N), "q", N)
        put(f"blk.{i}.attn_k.weight", llama_cpp_permute(p["k"][i].reshape(D, K * H).T, K), "k", K)
        put(f"blk.{i}.attn_v.weight", p["v"][i].reshape(D, K * H).T, "v")
        put(f"blk.{i}.attn_output.weight", p["o"][i].reshape(N * H, D).T, "o")
        put(f"blk.{i}.ffn_gate.weight", p["gate_up"][i][:, 0].T, "gate")
        put(f"blk.{i}.ffn_up.weight", p["gate_up"][i][:, 1].T, "up")
        put(f"blk.{i}.ffn_down.weight", p["down"][i].T, "down")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shapes = {"q": (D, N, H), "k": (D, K, H), "v": (D, K, H), "o": (N, H, D)}
    out = {k: np.stack([m.T.reshape(shapes.get(k, m.T.shape)) for m in ms]) for k, ms in held.items()}
    out["gate_up"] = np.stack([out.pop("gate"), out.pop("up")], axis=2)  # [L, D, 2, F], as jaxserve stores it
    return out


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=1)


@pytest.mark.parametrize(
    "qtype",
    [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K],
    ids=lambda t: t.name,
)
def test_import_each_type(tmp_path, params, qtype):
    path = tmp_path / f"model-{qtype.name}.gguf"
    held = write_gguf(path, params, qtype, np.random.default_rng(0))
    cfg, got, tok = read_gguf(path, progress=False)
    assert cfg == CFG
    lp = got["params"]["layers"]
    for name in ("q", "k", "v", "o", "gate_up", "down"):
        np.testing.assert_array_equal(lp[name], held[name], err_msg=name)
    np.testing.assert_array_equal(got["params"]["lm_head"], held["lm_head"][0])
    if qtype == T.F32:  # lossless: the import recovers the original (un-permuted) weights exactly
        for name in ("q", "k", "v", "o", "gate_up", "down"):
            np.testing.assert_array_equal(lp[name], params["params"]["layers"][name], err_msg=name)
    elif qtype not in K_QUANTS:  # quantized from the originals: close to them
        err = np.abs(lp["q"] - params["params"]["layers"]["q"]).max()
        assert err < 0.25 * np.abs(params["params"]["layers"]["q"]).max()
    assert tok.eos_id == CFG.vocab_size - 1 and tok.token_id("<|end|>") == CFG.vocab_size - 1


def test_convert_then_load_round_trip(tmp_path, params):
    path = tmp_path / "model.gguf"
    write_gguf(path, params, T.F32, np.random.default_rng(0))
    out = convert_gguf(path, tmp_path / "ckpt", progress=False)
    model = load_checkpoint(out, make_mesh(1, 2))
    assert model.cfg == CFG
    for a, b in zip(np.asarray(model.params["params"]["layers"]["q"]), np.asarray(params["params"]["layers"]["q"])):
        np.testing.assert_array_equal(a, b)
    assert model.tokenizer.decode(model.tokenizer.encode("hello world")) == "hello world"


def test_a_checkpoint_of_an_older_layout_is_refused_not_misread(tmp_path, params):
    path = tmp_path / "model.gguf"
    write_gguf(path, params, T.F32, np.random.default_rng(0))
    out = convert_gguf(path, tmp_path / "ckpt", progress=False)
    (out / "format").unlink()  # as written before the format marker (separate gate and up weights)
    assert not is_checkpoint(out)  # so a model card's checkpoint is converted again on next use
    with pytest.raises(ValueError, match="older jaxserve"):
        load_checkpoint(out, make_mesh(1, 1))


def test_convert_command(tmp_path, params):
    path = tmp_path / "My-Model.gguf"
    write_gguf(path, params, T.Q8_0, np.random.default_rng(0))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxserve.cli",
            "convert",
            str(path),
            "--name",
            "mine",
            "--checkpoints",
            str(tmp_path / "root"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "root" / "mine" / "config.json").is_file()
    assert "dequantizing" in result.stderr  # the progress bar
    assert ModelConfig.load(tmp_path / "root" / "mine" / "config.json") == CFG


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'"):
        read_gguf(path, progress=False)


def llama_cpp_rope_freqs(theta, head_dim, factor, low, high, original):
    """What llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel) writes as `rope_freqs.weight` for HF's
    llama3 rope_scaling: per frequency, the divisor llama.cpp applies, in float32."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_freqs_give_hf_llama3_scaling(tmp_path, params):
    """A Llama 3.1+ GGUF carries its llama3 RoPE scaling only as `rope_freqs.weight`: dividing by it is
    HF's llama3 scaling (all three regimes occur at theta 50000, head_dim 32), up to float32 storage."""
    path = tmp_path / "llama3.gguf"
    freqs = llama_cpp_rope_freqs(CFG.rope_theta, CFG.head_dim, 8.0, 1.0, 4.0, 8192)
    assert {1.0, 8.0} < set(freqs.tolist())  # kept, divided by the factor, and blended frequencies
    write_gguf(path, params, T.F32, np.random.default_rng(0), extra={"rope_freqs.weight": freqs})
    cfg, got, _ = read_gguf(path, progress=False)
    llama3 = dataclasses.replace(CFG, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    inv_freq = CFG.rope_theta ** (-np.arange(0, CFG.head_dim, 2) / CFG.head_dim)
    np.testing.assert_allclose(cfg.rope_scaling.apply(inv_freq), llama3.rope_scaling.apply(inv_freq), rtol=1e-6)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    ids = [7 * i % CFG.vocab_size for i in range(CFG.max_context)]  # unscaled, these logits differ by 1e-3
    np.testing.assert_allclose(full_logits(cfg, got, ids), full_logits(llama3, got, ids), rtol=0, atol=1e-4)


def test_unknown_gguf_tensors_and_rope_scalings_are_refused_by_name(tmp_path, params):
    rng = np.random.default_rng(0)
    cases = [
        ({"extra": {"blk.0.attn_sinks.weight": np.zeros(8, np.float32)}}, "unexpected GGUF tensor 'blk.0.attn_sinks"),
        ({"rope_scaling": (gguf.RopeScalingType.YARN, 4.0)}, "unsupported GGUF RoPE scaling 'yarn'"),
        (
            {
                "rope_scaling": (gguf.RopeScalingType.LINEAR, 2.0),
                "extra": {"rope_freqs.weight": np.ones(16, np.float32)},
            },
            "both linear RoPE scaling and rope_freqs",
        ),
    ]
    for i, (kwargs, message) in enumerate(cases):
        write_gguf(tmp_path / f"{i}.gguf", params, T.F32, rng, **kwargs)
        with pytest.raises(ValueError, match=message):
            read_gguf(tmp_path / f"{i}.gguf", progress=False)
    write_gguf(tmp_path / "linear.gguf", params, T.F32, rng, rope_scaling=(gguf.RopeScalingType.LINEAR, 2.0))
    assert read_gguf(tmp_path / "linear.gguf", progress=False)[0].rope_scaling == RopeScaling("linear", 2.0)


def test_gguf_conversion_streams_tensor_by_tensor(tmp_path):
    """As for Hugging Face directories (test_hf_import): converting a GGUF holds a few dequantized tensors
    on the host at a time, never the parameter tree nor one stacked parameter (tracemalloc's peak of
    Python's and NumPy's allocations), and float32 weights come through exactly."""
    deep = dataclasses.replace(CFG, n_layers=24)
    params = init_params(deep, seed=2)
    path = tmp_path / "deep.gguf"
    write_gguf(path, params, T.F32, np.random.default_rng(0), cfg=deep)
    mesh = make_mesh(1, 1)
    out, peak = streamed_conversion(convert_gguf, path, tmp_path, mesh)
    model = load_checkpoint(out, mesh)
    assert_streamed(peak, model.params)
    jax.tree.map(np.testing.assert_array_equal, model.params, params)


def test_a_tensor_type_outside_the_tested_list_is_refused_by_name():
    class Tensor:  # as GGUFReader returns one, of a type jaxserve does not import
        name, tensor_type, data = "blk.0.attn_q.weight", T.IQ2_XS, np.zeros(0, np.uint8)

    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' has type IQ2_XS"):
        dequantize(Tensor)


def test_load_converts_dtype(tiny_dir):
    """--dtype bfloat16: weights convert as they load and the model still continues its corpus."""
    import jax.numpy as jnp

    from jaxserve.device.build import build_engine
    from jaxserve.engine.bridge import complete
    from jaxserve.engine.types import EngineRequest, SamplingParams

    model = load_checkpoint(tiny_dir, make_mesh(1, 1), dtype="bfloat16")
    assert model.cfg.dtype == "bfloat16"
    assert model.params["params"]["layers"]["q"].dtype == jnp.bfloat16
    engine = build_engine(model, slots=1, max_context=128, warmup=False)
    try:
        deltas, _ = complete(
            engine,
            EngineRequest(
                "b",
                tuple(model.tokenizer.encode("The Lord is my shepherd")),
                max_tokens=6,
                sampling=SamplingParams(temperature=0.0),
            ),
            120,
        )
        assert "".join(d.text for d in deltas).startswith("; I shall")
    finally:
        engine.shutdown()


def test_a_chat_template_read_from_the_source_is_kept_in_the_checkpoint(tmp_path, tiny_dir, mesh1):
    """A checkpoint converted before templates were stored reads its source (for a GGUF file, seconds)
    once: the template is written beside the tokenizer, and later loads read that."""
    import json
    import shutil

    from jaxserve.checkpoint import SOURCE
    from jaxserve.tokenizer import CHAT_TEMPLATE

    source = tmp_path / "hf"
    source.mkdir()
    (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": "first"}))
    old = tmp_path / "old-checkpoint"
    shutil.copytree(tiny_dir, old)
    (old / CHAT_TEMPLATE).unlink(missing_ok=True)
    (old / SOURCE).write_text(str(source))
    assert load_checkpoint(old, mesh1).tokenizer.chat_template == "first"
    assert (old / CHAT_TEMPLATE).read_text() == "first"
    (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": "changed"}))
    assert load_checkpoint(old, mesh1).tokenizer.chat_template == "first"  # the source is not read again
