"""The engine on real models: reference tokens, batch invariance, stop strings, UTF-8, no recompiles."""

import random
import threading

import numpy as np
import pytest
from served import own_pages

from jaxserve.device.build import build_engine
from jaxserve.engine.bridge import complete
from jaxserve.engine.types import EngineRequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def make_engine(model, slots, cache_len):
    return build_engine(model, slots=slots, max_context=cache_len)


@pytest.fixture(scope="module")
def smol_engine(smollm2):
    eng = make_engine(smollm2, slots=32, cache_len=256)
    yield eng
    eng.shutdown()


def tokens_of(deltas, index=0):
    return [t.token_id for d in deltas if d.index == index and not d.echo for t in d.tokens]


def text_of(deltas, index=0):
    return "".join(d.text for d in deltas if d.index == index and not d.echo)


def run_all(engine, requests):
    """Submit all at once from threads; returns {request_id: (deltas, usage)}."""
    results = {}

    def run(r):
        results[r.request_id] = complete(engine, r, timeout=600)

    threads = [threading.Thread(target=run, args=(r,)) for r in requests]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def random_params(rng, vocab):
    return SamplingParams(
        temperature=rng.choice([0.0, 0.7, 1.0, 1.5]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        presence_penalty=rng.uniform(-1, 1),
        frequency_penalty=rng.uniform(-1, 1),
        logit_bias=((rng.randrange(vocab), rng.choice([-100.0, 5.0])),),
    )


@pytest.mark.parametrize(
    "target",
    [
        dict(sampling=GREEDY),
        dict(sampling=SamplingParams(temperature=0.9, top_p=0.9, frequency_penalty=0.5), seed=1234),
    ],
    ids=["greedy", "seeded"],
)
def test_batch_invariance(smol_engine, smollm2, target):
    tok = smollm2.tokenizer
    prompt = tuple(tok.encode("Once upon a time, there was a little"))
    alone, _ = complete(smol_engine, EngineRequest("alone", prompt, max_tokens=24, **target), timeout=300)
    rng = random.Random(0)
    others = [
        EngineRequest(
            f"o{i}",
            tuple(tok.encode(f"Story number {i}: the {rng.choice(['cat', 'sea', 'war'])}")),
            max_tokens=rng.randint(4, 30),
            sampling=random_params(rng, smollm2.cfg.vocab_size),
            seed=rng.randrange(1000),
        )
        for i in range(31)
    ]
    compiles = dict(smol_engine.core.compiles)
    results = run_all(
        smol_engine, others[:15] + [EngineRequest("crowd", prompt, max_tokens=24, **target)] + others[15:]
    )
    assert tokens_of(results["crowd"][0]) == tokens_of(alone) and len(tokens_of(alone)) > 0
    assert dict(smol_engine.core.compiles) == compiles  # nothing recompiled, whatever the parameters
    for r in others:
        deltas, usage = results[r.request_id]
        assert deltas[-1].finish_reason in ("stop", "length")
        assert usage.completion_tokens <= r.max_tokens


def test_stop_string_split_across_tokens(smol_engine, smollm2):
    prompt = tuple(smollm2.tokenizer.encode("The capital of France is"))
    deltas, usage = complete(
        smol_engine, EngineRequest("s", prompt, max_tokens=16, sampling=GREEDY, stop=("\n\nThe",)), timeout=120
    )
    # greedy continues " Paris.\n\nThe answer": the stop spans the tokens "\n", "\n", "The"
    assert text_of(deltas) == " Paris."
    assert deltas[-1].finish_reason == "stop"
    assert all("\n" not in d.text for d in deltas)


def test_cjk_and_emoji_stream_whole(smol_engine, smollm2):
    tok = smollm2.tokenizer
    prompt = tuple(tok.encode("中文：你好，世界！我喜欢学习中文。🙂🙂🙂 日本語：こんにちは。"))
    deltas, _ = complete(
        smol_engine, EngineRequest("u", prompt, max_tokens=40, sampling=GREEDY, ignore_eos=True), timeout=120
    )
    pieces = [d.text for d in deltas]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(tokens_of(deltas))
    assert any(ord(ch) > 0x2E80 for ch in "".join(pieces))  # the continuation really is multi-byte text


def test_sixty_four_concurrent_requests_on_the_tiny_model(tiny):
    eng = make_engine(tiny, slots=64, cache_len=128)
    try:
        prompt = tuple(tiny.tokenizer.encode("The Lord is my shepherd"))
        alone = text_of(complete(eng, EngineRequest("alone", prompt, max_tokens=12, sampling=GREEDY), timeout=120)[0])
        assert alone.startswith("; I shall not want.")
        rng = random.Random(1)
        reqs = []
        for i in range(64):
            if i % 2:
                reqs.append(EngineRequest(f"g{i}", prompt, max_tokens=12, sampling=GREEDY))
            else:
                reqs.append(
                    EngineRequest(
                        f"r{i}",
                        tuple(tiny.tokenizer.encode("It was the")),
                        n=rng.choice([1, 2]),
                        max_tokens=rng.randint(1, 20),
                        seed=i,
                        sampling=random_params(rng, tiny.cfg.vocab_size),
                    )
                )
        compiles = dict(eng.core.compiles)
        results = run_all(eng, reqs)
        for r in reqs:
            deltas, usage = results[r.request_id]
            if r.request_id.startswith("g"):
                assert text_of(deltas) == alone
            finished = [d for d in deltas if d.finish_reason]
            assert len(finished) == r.n
        assert dict(eng.core.compiles) == compiles
        assert eng.active_slots == 0
    finally:
        eng.shutdown()


def test_prefill_without_scoring_gives_the_same_next_token_logits(tiny):
    """Unless a prompt is echoed, prefill computes logits only at each row's last real token: packed rows
    of different lengths must get exactly what the scored (every-position) prefill gives there."""
    from jaxserve.device.runner import JaxRunner
    from jaxserve.engine.plan import PrefillRow

    core = JaxRunner(tiny, slots=4, cache_len=128, eos_id=None)
    ids = tiny.tokenizer.encode("It was the best of times, it was the worst of times")
    rows = [
        PrefillRow(0, ids[:5], 0, ids[1:6]),
        PrefillRow(1, ids[:11], 0, ids[1:12]),
        PrefillRow(2, ids[:2], 0, ids[1:3]),
    ]
    plain = core.fetch(core.prefill(rows, own_pages(core)))
    scored = core.fetch(core.prefill(rows, own_pages(core), score=True))
    np.testing.assert_allclose(plain.last_logits[:3], scored.last_logits[:3], rtol=0, atol=1e-5)
    assert not np.allclose(scored.last_logits[0], scored.last_logits[1])  # rows really differ
    assert (plain.logprobs == 0).all() and (scored.logprobs[:, :2] < 0).all()  # scored: real prompt logprobs


def test_a_prompt_whose_padded_last_chunk_passes_the_cache_end(tiny):
    """300 positions: a 290-token prompt is prefilled as 256 + 34 tokens, the second padded to 64, so its
    padding runs past the cache's end. It completes like the full pass, compiling nothing new."""
    eng = make_engine(tiny, slots=2, cache_len=300)
    try:
        words = tiny.tokenizer.encode("It was the best of times, it was the worst of times, " * 40)
        prompt = tuple(words[:290])
        compiles = dict(eng.core.compiles)
        deltas, usage = complete(eng, EngineRequest("long", prompt, max_tokens=5, sampling=GREEDY), timeout=120)
        assert usage.completion_tokens == 5 and deltas[-1].finish_reason == "length"
        assert dict(eng.core.compiles) == compiles
        from served import full_logits

        assert tokens_of(deltas)[0] == int(full_logits(tiny.cfg, tiny.params, list(prompt))[-1].argmax())
    finally:
        eng.shutdown()
