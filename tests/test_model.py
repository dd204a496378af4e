"""The Flax transformer against the NumPy oracle, and cached prefill/decode against one full pass."""

import numpy as np
import pytest

from jaxserve.engine.steps import Forward
from reference_model import forward as reference_forward


def full_logits(model, tokens):
    fw = Forward(model.cfg, model.mesh, model.param_shardings, slots=1, cache_len=len(tokens))
    logits, _ = fw(model.params, np.array([tokens]), np.arange(len(tokens))[None], fw.new_cache(), len(tokens))
    return np.asarray(logits[0])


def test_matches_numpy_reference(tiny):
    tokens = tiny.tokenizer.encode("The Lord is my shepherd; I shall not want.")
    expected = reference_forward(tiny.cfg, tiny.params, tokens)
    np.testing.assert_allclose(full_logits(tiny, tokens), expected, atol=1e-4, rtol=1e-4)


def test_prefill_chunks_then_decode_equal_full_pass(tiny):
    """Two sequences of different lengths in one batch: chunked prefill, then one token a step."""
    seqs = [tiny.tokenizer.encode("It was the best of times, it was the worst of times, it was"),
            tiny.tokenizer.encode("Call me Ishmael. Some years ago")]
    expected = [full_logits(tiny, s) for s in seqs]
    fw = Forward(tiny.cfg, tiny.mesh, tiny.param_shardings, slots=2, cache_len=64)
    cache = fw.new_cache()
    prefix = [8, 5]  # prefill these many tokens in two chunks of 4 (padded), decode the rest
    for start in (0, 4):
        tokens = np.zeros((2, 4), np.int32)
        positions = np.zeros((2, 4), np.int32)
        for b, s in enumerate(seqs):
            n = max(0, min(4, prefix[b] - start))
            tokens[b, :n] = s[start: start + n]
            # padding continues the positions past the prefix; decode overwrites those entries later
            positions[b] = np.arange(start, start + 4) if n else np.arange(prefix[b], prefix[b] + 4)
        logits, cache = fw(tiny.params, tokens, positions, cache, 64)
        for b in range(2):
            n = max(0, min(4, prefix[b] - start))
            if n:
                np.testing.assert_allclose(logits[b, :n], expected[b][start: start + n], atol=1e-5, rtol=1e-5)
    steps = max(len(s) for s in seqs) - min(prefix)
    pos = list(prefix)
    for _ in range(steps):
        tokens = np.array([[s[min(p, len(s) - 1)]] for s, p in zip(seqs, pos)], np.int32)
        logits, cache = fw(tiny.params, tokens, np.array([[p] for p in pos], np.int32), cache, 64)
        for b, s in enumerate(seqs):
            if pos[b] < len(s):
                np.testing.assert_allclose(logits[b, 0], expected[b][pos[b]], atol=1e-5, rtol=1e-5)
        pos = [p + 1 for p in pos]


def test_reused_slot_ignores_previous_occupant(tiny):
    """A slot that held a longer sequence gives the same logits to a new, shorter one (no reset needed)."""
    long = tiny.tokenizer.encode("We hold these truths to be self-evident, that all men are created equal")
    short = tiny.tokenizer.encode("Twinkle, twinkle, little star")
    fw = Forward(tiny.cfg, tiny.mesh, tiny.param_shardings, slots=1, cache_len=64)
    cache = fw.new_cache()
    _, cache = fw(tiny.params, np.array([long]), np.arange(len(long))[None], cache, 64)
    logits, _ = fw(tiny.params, np.array([short]), np.arange(len(short))[None], cache, 64)
    np.testing.assert_allclose(logits[0], full_logits(tiny, short), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [16, 32])
def test_window_reads_only_the_filled_part(tiny, window):
    """Logits do not depend on the attention window once it covers every position."""
    tokens = tiny.tokenizer.encode("Shall I compare thee to a summer's day?")[:16]
    fw = Forward(tiny.cfg, tiny.mesh, tiny.param_shardings, slots=1, cache_len=64)
    logits, _ = fw(tiny.params, np.array([tokens]), np.arange(len(tokens))[None], fw.new_cache(), window)
    np.testing.assert_allclose(logits[0], full_logits(tiny, tokens), atol=1e-5, rtol=1e-5)
