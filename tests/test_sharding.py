"""Sharded against unsharded: the same logits on every mesh shape of the 8 virtual CPU devices."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxserve.checkpoint import load_checkpoint
from jaxserve.engine.steps import Forward
from jaxserve.sharding import logical_to_spec, make_mesh, parse_mesh


def batch_logits(model, prompts, slots):
    length = max(len(p) for p in prompts)
    tokens = np.zeros((slots, length), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    positions = np.broadcast_to(np.arange(length), (slots, length))
    fw = Forward(model.cfg, model.mesh, model.param_shardings, slots=slots, cache_len=64)
    logits, cache = fw(model.params, tokens, positions, fw.new_cache(), 64)
    # one decode step too, so the sharded cache write/read path is covered
    step, _ = fw(model.params, tokens[:, -1:], np.full((slots, 1), length), cache, 64)
    return np.asarray(logits), np.asarray(step), cache


TINY_PROMPTS = ["The Lord is my shepherd", "It was the best", "Call me Ishmael.", "Alice was beginning",
                "Four score and", "To be, or not", "Happy families", "Tyger Tyger"]


@pytest.fixture(scope="module")
def tiny_single(tiny):
    prompts = [tiny.tokenizer.encode(t) for t in TINY_PROMPTS]
    return prompts, batch_logits(tiny, prompts, 8)


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)])
def test_tiny_mesh_equals_single_device(tiny_dir, tiny_single, shape):
    assert len(jax.devices()) >= 8, "conftest should force 8 CPU devices"
    prompts, (want, want_step, _) = tiny_single
    model = load_checkpoint(tiny_dir, make_mesh(*shape))
    got, got_step, cache = batch_logits(model, prompts, 8)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_step, want_step, atol=1e-4, rtol=1e-4)
    # the weights and the cache are really split where the mesh divides them
    data, mdl = shape
    q = model.params["params"]["layers"]["q"].sharding.spec
    assert q == PartitionSpec(None, None, "model" if mdl > 1 else None, None)
    assert cache.k.sharding.spec[1] == ("data" if data > 1 else None)
    assert len(model.params["params"]["layers"]["q"].addressable_shards) == 8


@pytest.mark.parametrize("shape", [(1, 3), (2, 1)])
def test_smollm2_mesh_equals_single_device(smollm2_dir, smollm2, reference, shape):
    """Within 1e-4 of the logit scale (|logits| reach ~25): after 30 layers, float32 sums taken in another
    order (the all-reduce of sharded heads) move decode logits by up to ~1e-3, and the unsharded model
    itself is ~3e-4 from a float64 oracle, so a tighter absolute bound would test rounding, not sharding."""
    prompts = [p["prompt_ids"] for p in reference["prompts"][:2]]
    want, want_step, _ = batch_logits(smollm2, prompts, 2)
    got, got_step, _ = batch_logits(load_checkpoint(smollm2_dir, make_mesh(*shape)), prompts, 2)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(got_step, want_step, atol=1e-4 * scale, rtol=0)
    assert (got_step.argmax(-1) == want_step.argmax(-1)).all()


def test_undivisible_axis_is_replicated_with_a_note(caplog):
    mesh = make_mesh(1, 2)
    with caplog.at_level(logging.INFO, logger="jaxserve.sharding"):
        spec = logical_to_spec(("embed", "q_heads", "head_dim"), (576, 9, 64), mesh)
    assert spec == PartitionSpec(None, None, None)
    assert "q_heads" in caplog.text
    assert logical_to_spec(("embed", "q_heads", "head_dim"), (576, 8, 64), mesh) == PartitionSpec(None, "model", None)


def test_parse_mesh():
    assert parse_mesh("data=2,model=4") == (2, 4)
    assert parse_mesh("model=3") == (1, 3)
    with pytest.raises(ValueError):
        parse_mesh("rows=2")
    with pytest.raises(ValueError):
        make_mesh(4, 4)
