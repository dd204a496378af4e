"""The Flax transformer against the NumPy oracle, and the served steps (chunked prefill, then decode one
token a step for several slots at once) against one full forward pass."""

import jax
import numpy as np
from reference_model import forward as reference_forward
from served import full_logits, greedy_decode, own_pages, scored_prefill, targets

from jaxserve.device import steps
from jaxserve.device.runner import JaxRunner


def log_softmax(x):
    return np.asarray(jax.nn.log_softmax(np.asarray(x, np.float64), axis=-1))


def test_matches_numpy_reference(tiny):
    tokens = tiny.tokenizer.encode("The Lord is my shepherd; I shall not want.")
    expected = reference_forward(tiny.cfg, tiny.params, tokens)
    np.testing.assert_allclose(full_logits(tiny.cfg, tiny.params, tokens), expected, atol=1e-4, rtol=1e-4)


def test_served_prefill_scores_every_position_as_the_full_pass(tiny):
    tokens = tiny.tokenizer.encode("It was the best of times, it was the worst of times, it was")
    want = log_softmax(full_logits(tiny.cfg, tiny.params, tokens))
    core = JaxRunner(tiny, slots=2, cache_len=128, eos_id=None)
    for chunk in (len(tokens), 5):  # one call, and chunks continuing each other in the cache
        lp, top_ids, top_lp, last = scored_prefill(core, 1, tokens, chunk)
        np.testing.assert_allclose(lp, want[np.arange(len(tokens) - 1), tokens[1:]], atol=1e-5)
        assert (top_ids[..., :5] == np.argsort(-want, axis=-1)[:, :5]).all()
        np.testing.assert_allclose(top_lp, np.sort(want, axis=-1)[:, ::-1][:, :20], atol=1e-5)
        np.testing.assert_allclose(last, full_logits(tiny.cfg, tiny.params, tokens)[-1], atol=1e-5)


def test_prefill_then_decode_equals_the_full_pass(tiny):
    """Two prompts of different lengths prefilled in chunks, then 12 greedy steps decoding both slots
    together: every generated token's logprob and top 5 equal one full pass over prompt + tokens."""
    prompts = [
        tiny.tokenizer.encode("Call me Ishmael. Some years ago"),
        tiny.tokenizer.encode("It was the best of times, it was the worst of times, it was"),
    ]
    core = JaxRunner(tiny, slots=2, cache_len=128, eos_id=None)
    for prompt, (tokens, lps, top_ids, top_lp) in zip(prompts, greedy_decode(core, prompts, 12, chunk=4)):
        want = log_softmax(full_logits(tiny.cfg, tiny.params, prompt + list(tokens)))[len(prompt) - 1 : -1]
        assert (tokens == want.argmax(-1)).all()
        np.testing.assert_allclose(lps, want[np.arange(12), tokens], atol=1e-5)
        assert (top_ids[..., :5] == np.argsort(-want, axis=-1)[:, :5]).all()
        np.testing.assert_allclose(top_lp, np.sort(want, axis=-1)[:, ::-1][:, :20], atol=1e-5)


def test_reused_slot_ignores_previous_occupant(tiny):
    """A slot that held a longer sequence gives the same logits to a new, shorter one (no reset needed)."""
    long = tiny.tokenizer.encode("We hold these truths to be self-evident, that all men are created equal")
    short = tiny.tokenizer.encode("Twinkle, twinkle, little star")
    core = JaxRunner(tiny, slots=1, cache_len=128, eos_id=None)
    scored_prefill(core, 0, long)
    lp, *_, last = scored_prefill(core, 0, short)
    want = log_softmax(full_logits(tiny.cfg, tiny.params, short))
    np.testing.assert_allclose(lp, want[np.arange(len(short) - 1), short[1:]], atol=1e-5)
    np.testing.assert_allclose(last, full_logits(tiny.cfg, tiny.params, short)[-1], atol=1e-5)


def test_attention_window_reads_only_the_filled_part(tiny):
    """The jitted prefill gives the same result whatever (static) window covers the positions."""
    tokens = tiny.tokenizer.encode("Shall I compare thee to a summer's day?")[:16]
    core = JaxRunner(tiny, slots=1, cache_len=256, eos_id=None, page_size=16)
    outs = []
    for window in (16, 128, 256):
        core.state, out = steps.prefill(
            core.spec,
            tiny.params,
            core.state,
            np.array([tokens], np.int32),
            np.zeros(1, np.int32),
            np.array([len(tokens)], np.int32),
            own_pages(core),
            np.zeros(1, np.int32),
            np.array([targets(tokens)], np.int32),
            np.bool_(True),
            np.zeros(1, np.int32),  # the base: no LoRA adapter
            None,
            window,
        )
        outs.append(core.fetch(out))
    for out in outs[1:]:
        np.testing.assert_allclose(out.logprobs, outs[0].logprobs, atol=1e-5)
        np.testing.assert_allclose(out.last_logits, outs[0].last_logits, atol=1e-5)
