"""LoRA adapters: PEFT files read into jaxserve's layout (and refused by name where they would compute
something else), and the model with a stack of adapters applied per row equal to the base weights merged
with each adapter (W + s * B @ A), on a small random model."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from lora_files import ALL, merged, write_adapter
from safetensors.numpy import save_file

from jaxserve.checkpoint.peft import AdapterError, read_adapter
from jaxserve.model import KVCache, ModelConfig, Transformer, init_params, lora

CFG = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
T = 12


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=3)


@functools.cache
def forward(cfg):
    return jax.jit(Transformer(cfg).apply, static_argnums=5)


def logits(params, tokens, adapters=None, cfg=CFG):
    """A full forward pass over rows `tokens` [B, T] from an empty cache: logits [B, T, V]."""
    B, n = tokens.shape
    cache, table = KVCache.per_row(cfg, B, n)
    positions = np.broadcast_to(np.arange(n, dtype=np.int32), (B, n))
    out, _ = forward(cfg)(params, tokens, positions, cache, table, n, None, adapters)
    return np.asarray(out)


def stack_of(adapters, slots: int, rank: int):
    """The stack holding `adapters` (peft.Adapter) in entries 0, 1, ... of `slots`."""
    stack = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), lora.stack_shapes(CFG, slots, rank))
    for i, a in enumerate(adapters):
        stack = lora.write(stack, i, lora.entry(a.weights, CFG, rank))
    return stack


CASES = [  # (rank, targets, alpha, rslora, dtype)
    (4, ALL, 8.0, False, np.float32),
    (8, ("q_proj", "v_proj"), 16.0, True, np.float32),
    (2, ("o_proj", "up_proj", "down_proj"), 3.0, False, "bfloat16"),
    (16, "all-linear", 32.0, False, np.float16),
]


def test_each_adapter_in_a_mixed_batch_equals_its_merged_weights(params, tmp_path):
    """Rows of the base and of four adapters (ranks 2-16 padded to 16, rsLoRA, bf16/fp16 files,
    all-linear) in one forward pass: each row's logits at every position equal a pass of its own merged
    weights, and the base row the base's."""
    import ml_dtypes

    adapters = []
    for i, (rank, targets, alpha, rslora, dtype) in enumerate(CASES):
        modules = ALL if targets == "all-linear" else targets
        d = write_adapter(
            tmp_path / f"a{i}",
            CFG,
            rank,
            seed=i,
            targets=modules,
            alpha=alpha,
            rslora=rslora,
            dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype,
        )
        if targets == "all-linear":
            config = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "all-linear"}))
        adapters.append((d, read_adapter(d, f"a{i}", CFG, max_rank=16)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (6, T)).astype(np.int32)
    index = np.array([0, 1, 2, 3, 4, 2], np.int32)  # the base, each adapter, one adapter twice
    stack = stack_of([a for _, a in adapters], slots=5, rank=16)  # one entry unused
    got = logits(params, tokens, (stack, index))
    np.testing.assert_allclose(got[0], logits(params, tokens[:1])[0], atol=1e-5)
    for row in range(1, 6):
        d, _ = adapters[index[row] - 1]
        want = logits(merged(params, CFG, d), tokens[row : row + 1])[0]
        assert np.abs(want - logits(params, tokens[row : row + 1])[0]).max() > 1e-2  # the adapter does something
        np.testing.assert_allclose(got[row], want, atol=2e-4, rtol=1e-4)


def refused(tmp_path, expect: str, **kw):
    d = write_adapter(tmp_path / "bad", CFG, 4, seed=0, **kw)
    with pytest.raises(AdapterError, match=expect):
        read_adapter(d, "bad", CFG, max_rank=8)


@pytest.mark.parametrize(
    "key, value",
    [
        ("modules_to_save", ["lm_head"]),
        ("use_dora", True),
        ("bias", "lora_only"),
        ("rank_pattern", {"q_proj": 2}),
        ("alpha_pattern", {"q_proj": 2}),
        ("layers_to_transform", [0]),
        ("fan_in_fan_out", True),
        ("peft_type", "IA3"),
    ],
)
def test_config_keys_that_change_results_are_refused_by_name(tmp_path, key, value):
    refused(tmp_path, key if key != "peft_type" else "IA3", **{key: value})


@pytest.mark.parametrize(
    "targets, expect",
    [
        (["q_proj", "embed_tokens"], "embed_tokens"),
        (["lm_head"], "lm_head"),
        (".*q_proj", "regex"),
    ],
)
def test_targets_outside_the_projections_are_refused(tmp_path, targets, expect):
    d = write_adapter(tmp_path / "bad", CFG, 4, seed=0, targets=("q_proj",))
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))
    with pytest.raises(AdapterError, match=expect):
        read_adapter(d, "bad", CFG)


def test_files_that_do_not_fit_the_base_are_refused(tmp_path):
    d = write_adapter(tmp_path / "big", CFG, 16, seed=0, targets=("q_proj",))
    with pytest.raises(AdapterError, match="r=16 exceeds --max-lora-rank 8"):
        read_adapter(d, "big", CFG, max_rank=8)
    wider = dataclasses.replace(CFG, dim=40)  # another base: every A has the wrong input width
    d = write_adapter(tmp_path / "other", wider, 4, seed=0, targets=("q_proj",))
    with pytest.raises(AdapterError, match=r"shape \(4, 40\); the base and r=4 need \(4, 32\)"):
        read_adapter(d, "other", CFG)
    deeper = dataclasses.replace(CFG, n_layers=3)  # a layer the base lacks
    d = write_adapter(tmp_path / "deeper", deeper, 4, seed=0, targets=("q_proj",))
    with pytest.raises(AdapterError, match="layers.2.self_attn.q_proj"):
        read_adapter(d, "deeper", CFG)
    d = write_adapter(tmp_path / "partial", CFG, 4, seed=0, targets=("q_proj",))
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(AdapterError, match="missing, e.g. layer 0 v_proj lora_A"):
        read_adapter(d, "partial", CFG)
    d = write_adapter(tmp_path / "bias", CFG, 4, seed=0, targets=("q_proj",))
    extra = {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": np.zeros(64, np.float32)}
    save_file(extra, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="q_proj.lora_B.bias"):
        read_adapter(d, "bias", CFG)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only adapter_model.bin"):
        read_adapter(d, "bias", CFG)


def test_a_sharded_stack_gives_what_one_device_gives(params, tmp_path):
    """Weights, cache and adapter stack sharded over a model axis of 2 (the stack by the logical axes of
    the weights it updates): the same logits as on one device."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxserve.model import abstract_params
    from jaxserve.sharding import make_mesh, named_sharding, tree_shardings

    adapter = read_adapter(write_adapter(tmp_path / "a", CFG, 4, seed=5), "a", CFG, max_rank=4)
    stack = stack_of([adapter], slots=2, rank=4)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, T)).astype(np.int32)
    index = np.array([1, 0], np.int32)
    want = logits(params, tokens, (stack, index))
    mesh = make_mesh(1, 2)
    shapes, axes = abstract_params(CFG)
    sharded_params = jax.device_put(params, tree_shardings(axes, shapes, mesh))
    sharded_stack = {
        t: tuple(jax.device_put(w, named_sharding(ax, w.shape, mesh)) for w, ax in zip(stack[t], lora.stack_axes()[t]))
        for t in stack
    }
    assert any(not w.sharding.is_fully_replicated for pair in sharded_stack.values() for w in pair)
    got = logits(sharded_params, tokens, (sharded_stack, jax.device_put(index, NamedSharding(mesh, PartitionSpec()))))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_adapters_over_int8_base_weights(params, tmp_path):
    """int8 base weights with float adapters: each row equals the float model of the dequantized base
    weights merged with its adapter."""
    from jaxserve.checkpoint.quantize import GROUPED_AXIS, quantize_array
    from jaxserve.model.quant import dequantize, group_size

    int8_cfg = dataclasses.replace(CFG, quant="int8")
    quantized, dequantized = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, params)
    for scope in (quantized["params"], quantized["params"]["layers"], quantized["params"]["embed"]):
        for name in [n for n in scope if n in GROUPED_AXIS]:
            a = GROUPED_AXIS[name]
            scope[name], scope[name + "_scale"] = quantize_array(
                scope[name], a, group_size(int8_cfg, scope[name].shape[a])
            )
    layers, back = quantized["params"]["layers"], dequantized["params"]["layers"]
    for name in [n for n in layers if n in GROUPED_AXIS]:
        back[name] = np.asarray(jax.vmap(dequantize)(layers[name], layers[name + "_scale"]))
    embed = quantized["params"]["embed"]
    dequantized["params"]["embed"]["embedding"] = np.asarray(dequantize(embed["embedding"], embed["embedding_scale"]))
    directory = write_adapter(tmp_path / "a", CFG, 8, seed=11, std=0.1)
    stack = stack_of([read_adapter(directory, "a", CFG, max_rank=8)], slots=1, rank=8)
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, T)).astype(np.int32)
    got = logits(quantized, tokens, (stack, np.array([1, 0], np.int32)), cfg=int8_cfg)
    np.testing.assert_allclose(got[0], logits(merged(dequantized, CFG, directory), tokens[:1])[0], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], logits(dequantized, tokens[1:])[0], atol=2e-4, rtol=1e-4)
