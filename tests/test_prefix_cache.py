"""The paged cache on a real model, through the served steps: cached prefixes and preempted sequences give
exactly what computing everything afresh gives (tokens, seeded draws, echo logprobs), compiling nothing."""

import numpy as np
import pytest
from test_engine import run_all, tokens_of

from jaxserve.device.build import build_engine
from jaxserve.engine.bridge import complete
from jaxserve.engine.types import EngineRequest, SamplingParams

PAGE = 16  # small pages: short prompts span several


@pytest.fixture(scope="module")
def engines(tiny):
    cached = build_engine(tiny, slots=4, max_context=256, page_size=PAGE)
    plain = build_engine(tiny, slots=4, max_context=256, page_size=PAGE, prefix_caching=False, warmup=False)
    yield cached, plain
    cached.shutdown()
    plain.shutdown()


def requests(tok):
    doc = tok.encode("It was the best of times, it was the worst of times, it was the age of wisdom, " * 3)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, frequency_penalty=0.3)
    out = []
    for i, question in enumerate(["Who?", "Where was it?", "When did it happen, and why?", "Who?"]):
        ids = tuple(doc + tok.encode(question))
        sampling = seeded if i % 2 else SamplingParams(temperature=0.0)
        out.append(EngineRequest(f"q{i}", ids, max_tokens=12, sampling=sampling, seed=7, echo=True))
    return out


def echo_logprobs(deltas):
    return np.array([t.logprob for d in deltas if d.echo for t in d.tokens][1:])


def test_cached_prefixes_give_what_computing_afresh_gives(engines, tiny):
    cached, plain = engines
    compiles = dict(cached.core.compiles)
    for r in requests(tiny.tokenizer):
        got, _ = complete(cached, r, timeout=300)
        want, _ = complete(plain, r, timeout=300)
        assert tokens_of(got) == tokens_of(want) and len(tokens_of(want)) == 12
        np.testing.assert_allclose(echo_logprobs(got), echo_logprobs(want), atol=1e-5)
        assert len(echo_logprobs(got)) == len(r.prompt_ids) - 1
    assert cached.pool.hit_tokens >= 3 * (len(requests(tiny.tokenizer)[0].prompt_ids) // PAGE - 1) * PAGE
    assert plain.pool.hit_tokens == 0
    assert dict(cached.core.compiles) == compiles


def test_n_choices_on_shared_pages_equal_separate_requests(engines, tiny):
    cached, _ = engines
    prompt = tuple(tiny.tokenizer.encode("Call me Ishmael. Some years ago, never mind how long precisely"))
    sampling = SamplingParams(temperature=1.0)
    together, _ = complete(cached, EngineRequest("n", prompt, max_tokens=10, sampling=sampling, n=3, seed=5), 300)
    for j in range(3):  # choice j draws with seed + 1_000_003 j: a request of its own with that seed
        alone, _ = complete(
            cached, EngineRequest(f"c{j}", prompt, max_tokens=10, sampling=sampling, seed=5 + 1_000_003 * j), 300
        )
        assert tokens_of(together, j) == tokens_of(alone)


def test_preempted_sequences_finish_as_if_never_interrupted(tiny):
    """A pool of 12 pages of 16 for 4 slots of sequences that grow to 5 pages each: sequences are preempted
    and recomputed, and every output equals the one from a pool with room for all."""
    tok = tiny.tokenizer
    sampling = SamplingParams(temperature=0.9, presence_penalty=0.5)
    reqs = [
        EngineRequest(
            f"p{i}",
            tuple(tok.encode(f"Story {i}: once upon a time")),
            max_tokens=64,
            sampling=sampling,
            seed=i,
            ignore_eos=True,
        )
        for i in range(6)
    ]
    roomy = build_engine(tiny, slots=4, max_context=128, page_size=PAGE, warmup=False)
    tight = build_engine(tiny, slots=4, max_context=128, page_size=PAGE, num_pages=12)
    try:
        compiles = dict(tight.core.compiles)
        want = run_all(roomy, reqs)
        got = run_all(tight, reqs)
        assert tight.preemptions > 0 and roomy.preemptions == 0
        for r in reqs:
            assert tokens_of(got[r.request_id][0]) == tokens_of(want[r.request_id][0])
            assert got[r.request_id][1].completion_tokens == 64
        assert tight.pool.held == 0
        assert dict(tight.core.compiles) == compiles
    finally:
        roomy.shutdown()
        tight.shutdown()
