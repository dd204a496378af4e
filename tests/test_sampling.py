"""Sampling on hand-made logits with tokens worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.device.sampling import BLOCK, record, sample, top_k
from jaxserve.device.state import SamplingState
from jaxserve.engine.types import SamplingParams

V = 6


def state_for(*params: SamplingParams) -> SamplingState:
    state = SamplingState.initial(len(params), V)
    for slot, p in enumerate(params):
        state = state.write(slot, SamplingState.host_row(p, V))
    return state


def run(logits, *params, counts=None):
    state = state_for(*params)
    if counts is not None:
        state = state.replace(counts=jnp.asarray(counts, jnp.int32))
    tokens, chosen, top_ids, top_lp = jax.jit(sample)(jnp.asarray(logits, jnp.float32), state)
    state = record(state, tokens, jnp.ones(tokens.shape, bool))
    return np.asarray(tokens), np.asarray(chosen), np.asarray(top_ids), np.asarray(top_lp), state


LOGITS = [[1.0, 3.0, 2.0, 0.0, -1.0, 0.5]]


def test_greedy_is_argmax_and_logprobs_are_raw():
    tokens, chosen, top_ids, top_lp, state = run(LOGITS, SamplingParams(temperature=0.0))
    assert tokens[0] == 1
    lse = np.log(np.exp(LOGITS[0]).sum())
    np.testing.assert_allclose(chosen[0], 3.0 - lse, rtol=1e-6)
    assert list(top_ids[0]) == [1, 2, 0, 5, 3, 4]  # the top 20, of a vocabulary of 6: all of it, best first
    np.testing.assert_allclose(top_lp[0], np.array([3.0, 2.0, 1.0, 0.5, 0.0, -1.0]) - lse, rtol=1e-6)
    assert int(state.counts[0, 1]) == 1 and int(state.step[0]) == 1


def test_bias_bans_and_forces():
    banned, *_ = run(LOGITS, SamplingParams(temperature=0.0, logit_bias=((1, -100.0),)))
    assert banned[0] == 2
    forced, chosen, *_ = run(LOGITS, SamplingParams(temperature=1.0, logit_bias=((4, 100.0),), seed=3))
    assert forced[0] == 4
    # the logprob reported is the model's own, not the biased one
    np.testing.assert_allclose(chosen[0], -1.0 - np.log(np.exp(LOGITS[0]).sum()), rtol=1e-6)


def test_penalties_flip_the_argmax():
    counts = [[0, 2, 0, 0, 0, 0]]  # token 1 generated twice: 3 - 2*0.6 = 1.8 < 2
    tokens, *_ = run(LOGITS, SamplingParams(temperature=0.0, frequency_penalty=0.6), counts=counts)
    assert tokens[0] == 2
    tokens, *_ = run(LOGITS, SamplingParams(temperature=0.0, presence_penalty=1.5), counts=counts)
    assert tokens[0] == 2  # 3 - 1.5 = 1.5 < 2
    tokens, *_ = run(LOGITS, SamplingParams(temperature=0.0, presence_penalty=0.5), counts=counts)
    assert tokens[0] == 1  # 2.5 > 2
    tokens, *_ = run(LOGITS, SamplingParams(temperature=0.0, frequency_penalty=-1.5), counts=[[0, 0, 1, 0, 0, 0]])
    assert tokens[0] == 2  # a negative penalty favours repeats: 2 + 1.5 = 3.5 > 3


def test_top_p_cut_off():
    # probabilities 0.5, 0.3, 0.2 (logits are logs): top_p 0.7 keeps {0, 1}; 0.5 keeps {0} only
    logits = np.log([[0.5, 0.3, 0.2, 1e-9, 1e-9, 1e-9]])
    seen = set()
    for seed in range(60):
        tokens, *_ = run(logits, SamplingParams(temperature=1.0, top_p=0.7, seed=seed))
        seen.add(int(tokens[0]))
    assert seen == {0, 1}
    for seed in range(20):
        tokens, *_ = run(logits, SamplingParams(temperature=1.0, top_p=0.5, seed=seed))
        assert tokens[0] == 0


def test_seed_is_per_row_and_reproducible():
    logits = np.zeros((3, V))
    a, *_ = run(logits, SamplingParams(seed=7), SamplingParams(seed=1), SamplingParams(seed=2))
    b, *_ = run(logits, SamplingParams(seed=3), SamplingParams(seed=4), SamplingParams(seed=7))
    assert a[0] == b[2]
    draws = {int(run(logits[:1], SamplingParams(seed=s))[0][0]) for s in range(40)}
    assert len(draws) > 3  # uniform logits: different seeds spread over the vocabulary


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 2**63 - 1])
def test_seed_key_is_jax_random_key(seed):
    """The key a seed's row holds, built on the host, is jax.random.key's for the seed's low 32 bits."""
    row = SamplingState.host_row(SamplingParams(seed=seed), V)
    expected = jax.random.key_data(jax.random.key(seed & 0xFFFFFFFF))
    np.testing.assert_array_equal(row["key"], np.asarray(expected))
    assert row["key"].dtype == np.uint32


def test_record_counts_the_first_rows_only():
    state = state_for(SamplingParams(), SamplingParams(), SamplingParams())
    state = record(state, jnp.array([4, 2]), jnp.array([True, False]))
    assert np.asarray(state.counts).tolist() == [[0, 0, 0, 0, 1, 0], [0] * V, [0] * V]
    assert np.asarray(state.step).tolist() == [1, 0, 0]


def test_top_p_mask_equals_the_sorted_nucleus():
    """The bisected threshold keeps exactly the nucleus a sort would: the most likely tokens, in order,
    until their mass reaches top_p."""
    from jaxserve.device.sampling import _top_p_mask

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(200, 0.3), size=8).astype(np.float32)
    top_p = np.array([0.1, 0.5, 0.9, 0.95, 0.99, 0.3, 0.7, 1.0], np.float32)
    got = np.asarray(jax.jit(_top_p_mask)(jnp.asarray(probs), jnp.asarray(top_p)))
    for row, p, mask in zip(probs, top_p, got):
        order = np.argsort(-row)
        before = np.cumsum(row[order]) - row[order]
        want = np.zeros_like(mask)
        want[order[before < p]] = True
        assert (mask == want).all() or (p == 1.0 and mask.all())


def packed(allowed_ids, vocab=V):
    words = np.zeros(((vocab + 31) // 32,), np.uint32)
    for t in allowed_ids:
        words[t // 32] |= np.uint32(1) << np.uint32(t % 32)
    return words.view(np.int32)


def test_a_mask_row_limits_the_draw_and_leaves_other_rows_alone():
    """Row 0 allows tokens 2 and 4 only: greedy picks 2 (logit 2.0 beats -1.0), sampling never leaves {2, 4};
    row 1 is unconstrained (all ones): argmax 1. Logprobs stay the model's own (before the mask)."""
    logits = [LOGITS[0], LOGITS[0]]
    state = state_for(SamplingParams(temperature=0.0), SamplingParams(temperature=0.0))
    state = state.replace(allowed=state.allowed.at[0].set(jnp.asarray(packed([2, 4]))))
    tokens, chosen, _, _ = jax.jit(sample)(jnp.asarray(logits, jnp.float32), state)
    assert tokens.tolist() == [2, 1]
    np.testing.assert_allclose(chosen[0], jax.nn.log_softmax(jnp.asarray(LOGITS[0]))[2], rtol=1e-6)
    hot = state_for(*[SamplingParams(temperature=2.0, seed=s) for s in range(2)])
    hot = hot.replace(allowed=hot.allowed.at[0].set(jnp.asarray(packed([2, 4]))))
    seen = set()
    for step in range(40):
        tokens, *_ = jax.jit(sample)(jnp.asarray(logits, jnp.float32), hot.replace(step=hot.step + step))
        seen.add(int(tokens[0]))
    assert seen == {2, 4}


def test_mask_bits_past_the_first_word():
    """A vocabulary of 70: token 69 is bit 5 of word 2; the top bit of word 0 (token 31) is the sign bit."""
    from jaxserve.device.sampling import unpack_mask

    words = jnp.asarray(packed([0, 31, 32, 69], vocab=70))[None]
    assert np.flatnonzero(np.asarray(unpack_mask(words, 70))[0]).tolist() == [0, 31, 32, 69]


@pytest.mark.parametrize("shape", [(3, 64 * BLOCK), (2, 5, 24 * BLOCK), (4, 1000)])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_two_pass_top_k_equals_one_top_k_ties_included(shape, k):
    """Small integers (many ties within and across blocks) and -inf (masked entries): the same values and
    ids as jax.lax.top_k, the lower index first among equals; a vocabulary that is not whole blocks, or
    too few blocks for k, takes one top_k."""
    rng = np.random.default_rng(k)
    x = rng.integers(-3, 4, shape).astype(np.float32)
    x[rng.random(shape) < 0.3] = -np.inf
    x[..., -1] = 3.0  # a tie with the earlier maxima, in the last block
    got, want = jax.jit(top_k, static_argnums=1)(x, k), jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
