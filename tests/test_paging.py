"""The scheduler over a paged KV cache, against the fake core (pages of 4 positions, see fake_core.py):
prefix-cache hits, echo from cached pages, copy-on-write for n, preemption and resumption, no leaks."""

import threading

import pytest
from fake_core import FakeCore
from test_scheduler import StrideMatcher, ToyTokenizer, req, text_of

from jaxserve.engine.bridge import complete
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.types import ContextLengthError


def make(pages=None, caching=True, slots=4):
    return Scheduler(FakeCore(slots=slots, pages=pages), ToyTokenizer(), prefix_caching=caching).start()


@pytest.fixture
def engine():
    eng = make()
    yield eng
    eng.shutdown()


def prefills(engine):
    return [c[1] for c in engine.core.calls if c[0] == "prefill"]


def test_a_repeated_prefix_is_computed_once(engine):
    first, _ = complete(engine, req("a", range(10), max_tokens=3), timeout=10)
    engine.core.calls.clear()
    second, _ = complete(engine, req("b", list(range(8)) + [20, 21], max_tokens=3), timeout=10)
    assert prefills(engine) == [((0, 8, 2),)]  # two cached pages of four: only the last two tokens computed
    assert text_of(first) == "<10><11><12>" and text_of(second) == "<22><23><24>"
    assert (engine.pool.queried_tokens, engine.pool.hit_tokens) == (20, 8)
    assert engine.pool.held == 0  # everything dropped; the cached pages idle


def test_a_prompt_cached_whole_recomputes_only_its_last_token(engine):
    complete(engine, req("a", range(8), max_tokens=2), timeout=10)
    engine.core.calls.clear()
    deltas, _ = complete(engine, req("b", range(8), max_tokens=2), timeout=10)
    assert prefills(engine) == [((0, 7, 1),)]  # for its logits; the fake asserts the cached page holds it
    assert text_of(deltas) == "<8><9>"


def test_echo_from_cached_pages_gives_every_logprob(engine):
    prompt = list(range(1, 11))
    first, _ = complete(engine, req("a", prompt, max_tokens=1, echo=True), timeout=10)
    engine.core.calls.clear()
    second, _ = complete(engine, req("b", prompt, max_tokens=1, echo=True), timeout=10)
    assert prefills(engine) == [((0, 7, 3),)]  # from the last cached position: its row predicts token 8
    logprobs = [[t.logprob for t in d.tokens] for d in (first[0], second[0])]
    assert logprobs[0] == logprobs[1] == [None] + [-t / 100.0 for t in prompt[1:]]


def test_echo_does_not_take_pages_cached_without_their_rows(engine):
    complete(engine, req("a", range(10), max_tokens=1), timeout=10)
    engine.core.calls.clear()
    deltas, _ = complete(engine, req("b", range(10), max_tokens=1, echo=True), timeout=10)
    assert prefills(engine)[0] == ((0, 0, 4),)
    assert [t.logprob for t in deltas[0].tokens][1:] == [-t / 100.0 for t in range(1, 10)]


def test_without_prefix_caching_every_prompt_is_computed_whole():
    eng = make(caching=False)
    try:
        for rid in "ab":
            complete(eng, req(rid, range(8), max_tokens=1), timeout=10)
        assert prefills(eng) == [((0, 0, 4),), ((0, 4, 4),)] * 2
        assert eng.pool.hit_tokens == 0
    finally:
        eng.shutdown()


def test_choices_share_the_prompts_full_pages_and_copy_the_partial_one(engine):
    deltas, _ = complete(engine, req("a", range(6), max_tokens=3, n=3), timeout=10)
    copies = [c for c in engine.core.calls if c[0] == "copy_page"]
    assert len(copies) == 2  # the partial second page, once for each further choice
    assert [text_of(deltas, i) for i in range(3)] == ["<6><7><8>"] * 3
    assert engine.pool.held == 0


def test_a_sequence_that_needs_a_page_when_none_is_free_preempts_the_youngest():
    """6 pages of 4: three requests of 2 + 14 tokens need 4 pages each at the end; the youngest are
    preempted, recomputed when pages free up, and finish exactly as if never interrupted."""
    eng = make(pages=6)
    results = {}

    def run(i):
        results[i] = complete(eng, req(f"r{i}", [10 * i, 10 * i + 1], max_tokens=14), timeout=30)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for i in range(3):
            deltas, usage = results[i]
            assert text_of(deltas) == "".join(f"<{10 * i + 2 + k}>" for k in range(14))
            assert usage.completion_tokens == 14
        assert eng.preemptions >= 1 and any(c[0] == "resume" for c in eng.core.calls)
        assert eng.pool.held == 0
    finally:
        eng.shutdown()


def test_a_preempted_constrained_choice_resumes_with_its_matcher_in_step(monkeypatch):
    """As above, every request constrained (stride masks: each token 2 more than the last, so a mask out of
    step with the tokens shows): each matcher takes every token exactly once across preemption, and the
    resumed sequence goes on under the mask of its last token."""
    import jaxserve.engine.scheduler as scheduler_module

    StrideMatcher.seen = []
    monkeypatch.setattr(scheduler_module, "Matcher", StrideMatcher)
    eng = make(pages=6)
    results = {}

    def run(i):
        r = req(f"r{i}", [10 * i, 10 * i + 1], max_tokens=14, grammar="stride")
        results[i] = complete(eng, r, timeout=30)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        expected = [[10 * i + 2 + 2 * k for k in range(14)] for i in range(3)]
        for i in range(3):
            assert text_of(results[i][0]) == "".join(f"<{t}>" for t in expected[i])
        assert sorted(StrideMatcher.seen) == expected
        assert eng.preemptions >= 1 and any(c[0] == "resume" for c in eng.core.calls)
    finally:
        eng.shutdown()


def test_a_request_larger_than_the_whole_pool_is_refused_naming_it():
    eng = make(pages=3)
    try:
        with pytest.raises(ContextLengthError) as e:
            complete(eng, req("a", range(4), max_tokens=9), timeout=10)
        assert e.value.param == "prompt"
        with pytest.raises(ContextLengthError) as e:
            complete(eng, req("b", range(2), max_tokens=2, n=4), timeout=10)
        assert e.value.param == "n"
    finally:
        eng.shutdown()


def test_aborts_and_stops_give_every_page_back(engine):
    complete(engine, req("a", range(9), max_tokens=20, stop=("<12>",)), timeout=10)
    complete(engine, req("b", range(5), max_tokens=3, n=2), timeout=10)
    assert engine.pool.held == 0
