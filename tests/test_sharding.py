"""Sharded against unsharded: the same logits on every mesh shape of the 8 virtual CPU devices."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from served import GREEDY, greedy_decode, own_pages, scored_prefill

from jaxserve.checkpoint import load_checkpoint
from jaxserve.device.runner import JaxRunner
from jaxserve.device.state import DecodeState
from jaxserve.engine.plan import Start
from jaxserve.sharding import logical_to_spec, make_mesh, parse_mesh


def batch_logits(model, prompts, slots):
    """Through the served steps: each prompt's scored prefill (logprobs of its tokens, top 5, last
    logits), then 4 greedy decode steps of all slots together (tokens, logprobs, top 5)."""
    core = JaxRunner(model, slots=slots, cache_len=128, eos_id=None)
    prefills = [scored_prefill(core, b, p) for b, p in enumerate(prompts)]
    decoded = greedy_decode(core, prompts, 4)
    return prefills, decoded, core


def assert_close(got, want, atol):
    for g_prompt, w_prompt in zip(got, want):
        for g, w in zip(g_prompt, w_prompt):
            if np.issubdtype(np.asarray(w).dtype, np.integer):
                assert (np.asarray(g) == np.asarray(w)).all()
            else:
                np.testing.assert_allclose(g, w, atol=atol, rtol=0)


TINY_PROMPTS = [
    "The Lord is my shepherd",
    "It was the best",
    "Call me Ishmael.",
    "Alice was beginning",
    "Four score and",
    "To be, or not",
    "Happy families",
    "Tyger Tyger",
]


@pytest.fixture(scope="module")
def tiny_single(tiny):
    prompts = [tiny.tokenizer.encode(t) for t in TINY_PROMPTS]
    return prompts, batch_logits(tiny, prompts, 8)


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)])
def test_tiny_mesh_equals_single_device(tiny_dir, tiny_single, shape):
    assert len(jax.devices()) >= 8, "conftest should force 8 CPU devices"
    prompts, (want, want_step, _) = tiny_single
    model = load_checkpoint(tiny_dir, make_mesh(*shape))
    got, got_step, core = batch_logits(model, prompts, 8)
    assert_close(got, want, 1e-4)
    assert_close(got_step, want_step, 1e-4)
    # the weights and the cache are really split where the mesh divides them
    data, mdl = shape
    q = model.params["params"]["layers"]["q"].sharding.spec
    assert q == PartitionSpec(None, None, "model" if mdl > 1 else None, None)
    assert core.state.slots.tokens.sharding.spec in (PartitionSpec(), PartitionSpec(None))  # every replica: all
    assert (tuple(core.state.cache.k.sharding.spec) + (None,) * 5)[1] is None  # any row may hold any page
    # after prefills, inserts and steps, every array of the decode state is where it was declared
    declared = DecodeState.shardings(model.cfg, model.mesh, 8, core.pages, core.page_size)
    for array, sharding in zip(jax.tree.leaves(core.state), jax.tree.leaves(declared)):
        assert array.sharding.is_equivalent_to(sharding, array.ndim)
    assert len(model.params["params"]["layers"]["q"].addressable_shards) == 8


@pytest.mark.parametrize("shape", [(1, 3), (2, 1)])
def test_smollm2_mesh_equals_single_device(smollm2_dir, smollm2, reference, shape):
    """Within 1e-4 of the logit scale (|logits| reach ~25): after 30 layers, float32 sums taken in another
    order (the all-reduce of sharded heads) move decode logits by up to ~1e-3, and the unsharded model
    itself is ~3e-4 from a float64 oracle, so a tighter absolute bound would test rounding, not sharding."""
    prompts = [p["prompt_ids"] for p in reference["prompts"][:2]]
    want, want_step, _ = batch_logits(smollm2, prompts, 2)
    got, got_step, _ = batch_logits(load_checkpoint(smollm2_dir, make_mesh(*shape)), prompts, 2)
    scale = max(np.abs(w[3]).max() for w in want)  # the last logits
    assert_close(got, want, 1e-4 * scale)
    assert_close(got_step, want_step, 1e-4 * scale)  # greedy tokens equal, logprobs close


def decode_schedule(model, prompts, schedule):
    """Each prompt prefilled into its own slot, then one greedy decode step per entry of `schedule` over the
    slots up to that entry (the others wait): the tokens and logprobs of every step's rows."""
    core = JaxRunner(model, slots=len(prompts), cache_len=128, eos_id=None)
    for slot, prompt in enumerate(prompts):
        *_, last = scored_prefill(core, slot, prompt)
        core.fetch(core.insert(Start(slot, GREEDY, len(prompt), 64, False, logits_row=0), last))
    steps, done = [], np.zeros(len(prompts), int)
    for max_slot in schedule:
        at = max(len(p) + done[s] for s, p in enumerate(prompts[: max_slot + 1]))
        out = core.fetch(core.sample(core.forward(own_pages(core), at, max_slot)))
        steps.append((out.tokens[: max_slot + 1], out.logprobs[: max_slot + 1]))
        done[: max_slot + 1] += 1
    return steps


SPLIT_PROMPTS = TINY_PROMPTS + [t.upper() for t in TINY_PROMPTS]
SCHEDULE = [7, 15, 15, 3, 7, 15]  # rows 8 and 16 split, rows 4 does not


@pytest.fixture(scope="module")
def schedule_single(tiny):
    return decode_schedule(tiny, [tiny.tokenizer.encode(t) for t in SPLIT_PROMPTS], SCHEDULE)


@pytest.mark.parametrize("shape", [(2, 1), (8, 1)])
def test_split_rows_keep_every_copy_of_the_pool(tiny_dir, tiny, schedule_single, shape):
    """A decode step of SPLIT_FROM_ROWS rows or more is split over the data replicas, each computing its own
    rows' K/V; steps of fewer rows compute every row on every replica and read the pool's copy there. Steps
    alternating between the two give one device's tokens only if every replica's copy of the pool took
    every row's entries."""
    prompts = [tiny.tokenizer.encode(t) for t in SPLIT_PROMPTS]
    got = decode_schedule(load_checkpoint(tiny_dir, make_mesh(*shape)), prompts, SCHEDULE)
    for (g_tokens, g_lp), (w_tokens, w_lp) in zip(got, schedule_single):
        assert (g_tokens == w_tokens).all()
        np.testing.assert_allclose(g_lp, w_lp, atol=1e-4, rtol=0)


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
