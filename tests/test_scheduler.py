"""The scheduler against a fake core whose arithmetic is checkable by hand.

FakeCore: the first token after a prompt is (last prompt token + 1); every step adds 1 to each active
slot's token; the logprob of token t is -t/100. EOS is token 50. It records every call, so admission,
slot reuse, abort and one-step-late processing are visible.
"""

import time
import types

import numpy as np
import pytest

from jaxserve.engine.engine import _END, Engine, EngineRequest, QueueFull, Usage
from jaxserve.engine.sampling import SamplingParams

EOS = 50


def out(tokens, done, valid):
    tokens = np.asarray(tokens)
    return types.SimpleNamespace(tokens=tokens, logprobs=-tokens / 100.0, top_ids=np.stack([tokens] * 5, -1),
                                 top_logprobs=np.stack([-tokens / 100.0] * 5, -1), done=np.asarray(done),
                                 valid=np.asarray(valid))


class FakeCore:
    def __init__(self, slots=4, cache_len=64, chunk=4):
        self.slots, self.cache_len, self.chunk, self.eos_id = slots, cache_len, chunk, EOS
        self.tokens = np.zeros(slots, int)
        self.active = np.zeros(slots, bool)
        self.remaining = np.zeros(slots, int)
        self.stop_eos = np.zeros(slots, bool)
        self.calls = []

    @staticmethod
    def packing(count, longest):
        """Up to 4 whole prompts of at most 2 tokens go in one call."""
        return (4, 2) if count <= 4 and longest <= 2 else None

    def prefill(self, rows, score=False):
        self.calls.append(("prefill", tuple((slot, start, len(chunk)) for slot, chunk, start, _ in rows)))
        T = max(len(chunk) for _, chunk, _, _ in rows)
        logprobs = np.zeros((len(rows), T))
        for i, (_, _, _, targets) in enumerate(rows):
            logprobs[i, : len(targets)] = -np.asarray(targets) / 100.0
        return types.SimpleNamespace(logprobs=logprobs, top_ids=np.zeros((len(rows), T, 5), int),
                                     top_logprobs=np.zeros((len(rows), T, 5)),
                                     last_logits=[chunk[-1] for _, chunk, _, _ in rows])

    def fork(self, src, dst, length):
        self.calls.append(("fork", src, dst))

    def insert(self, slot, last_token, params, position, max_tokens, stop_on_eos):
        self.calls.append(("insert", slot))
        token = last_token + 1
        done = max_tokens <= 1 or (stop_on_eos and token == EOS)
        self.tokens[slot], self.active[slot] = token, not done
        self.remaining[slot], self.stop_eos[slot] = max_tokens - 1, stop_on_eos
        return out([token], [done], [True])

    def step(self, max_position, max_slot):
        time.sleep(0.002)  # a device step takes time: lets an abort land mid-stream
        self.calls.append(("step", tuple(np.flatnonzero(self.active))))
        valid = self.active.copy()
        self.tokens = np.where(valid, self.tokens + 1, self.tokens)
        self.remaining -= valid
        done = valid & ((self.remaining <= 0) | (self.stop_eos & (self.tokens == EOS)))
        self.active &= ~done
        return out(self.tokens.copy(), done, valid)

    def release(self, slot):
        self.calls.append(("release", slot))
        self.active[slot] = False

    @staticmethod
    def fetch(tree):
        return tree


class ToyTokenizer:
    """Token t is the text '<t>'."""

    def token_bytes(self, t):
        return f"<{t}>".encode()

    def decode(self, ids):
        return "".join(f"<{t}>" for t in ids)


@pytest.fixture
def engine():
    eng = Engine(FakeCore(), ToyTokenizer(), max_waiting=8).start()
    yield eng
    eng.shutdown()


def req(rid, prompt, **kw):
    return EngineRequest(rid, tuple(prompt), sampling=SamplingParams(temperature=0.0), **kw)


def text_of(deltas, index=0):
    return "".join(d.text for d in deltas if d.index == index and not d.echo)


def test_tokens_follow_the_arithmetic(engine):
    deltas, usage = engine.complete(req("a", [3, 7], max_tokens=4), timeout=10)
    assert text_of(deltas) == "<8><9><10><11>"
    assert deltas[-1].finish_reason == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, 4)


def test_eos_finishes_with_stop_and_is_not_text(engine):
    deltas, usage = engine.complete(req("a", [47], max_tokens=10), timeout=10)
    assert text_of(deltas) == "<48><49>"
    assert deltas[-1].finish_reason == "stop"
    assert usage.completion_tokens == 3  # the EOS token counts as generated
    deltas, _ = engine.complete(req("b", [47], max_tokens=4, ignore_eos=True), timeout=10)
    assert text_of(deltas) == "<48><49><50><51>"


def test_stop_string_releases_the_slot(engine):
    deltas, _ = engine.complete(req("a", [1], max_tokens=20, stop=("<5>",)), timeout=10)
    assert text_of(deltas) == "<2><3><4>"
    assert deltas[-1].finish_reason == "stop"
    assert ("release", 0) in engine.core.calls


def test_long_prompt_is_prefilled_in_chunks(engine):
    deltas, _ = engine.complete(req("a", range(10), max_tokens=1, echo=True), timeout=10)
    prefills = [c for c in engine.core.calls if c[0] == "prefill"]
    assert prefills == [("prefill", ((0, 0, 4),)), ("prefill", ((0, 4, 4),)), ("prefill", ((0, 8, 2),))]
    echo = deltas[0]
    assert echo.echo and echo.text == "".join(f"<{t}>" for t in range(10))
    assert echo.tokens[0].logprob is None
    assert [t.logprob for t in echo.tokens[1:]] == [-t / 100.0 for t in range(1, 10)]
    assert text_of(deltas) == "<10>"


def test_short_prompts_waiting_together_share_one_prefill():
    import queue
    eng = Engine(FakeCore(), ToyTokenizer())
    queues = [queue.Queue() for _ in range(4)]
    for i, q in enumerate(queues[:3]):
        eng.submit(req(f"s{i}", [10 * i + 1, 10 * i + 2], max_tokens=2, echo=i == 1), q.put)
    eng.submit(req("long", [7, 7, 7], max_tokens=1), queues[3].put)  # too long to pack: its own call
    eng.start()
    try:
        for i, q in enumerate(queues):
            items = []
            while not items or items[-1] is not _END:
                items.append(q.get(timeout=10))
            deltas = [d for d in items if hasattr(d, "echo")]
            want = "<8>" if i == 3 else f"<{10 * i + 3}><{10 * i + 4}>"
            assert text_of(deltas) == want
            if i == 1:  # echo from a packed row: its own targets
                assert deltas[0].echo and [t.logprob for t in deltas[0].tokens] == [None, -0.12]
        prefills = [c for c in eng.core.calls if c[0] == "prefill"]
        assert prefills[0] == ("prefill", ((0, 0, 2), (1, 0, 2), (2, 0, 2)))
        assert prefills[1] == ("prefill", ((3, 0, 3),))
    finally:
        eng.shutdown()


def test_n_shares_one_prefill_and_slots_are_reused(engine):
    deltas, usage = engine.complete(req("a", [20], max_tokens=3, n=3), timeout=10)
    assert [c[0] for c in engine.core.calls].count("prefill") == 1
    assert sorted(c[2] for c in engine.core.calls if c[0] == "fork") == [1, 2]
    for i in range(3):
        assert text_of(deltas, i) == "<21><22><23>"
    assert usage.completion_tokens == 9
    engine.core.calls.clear()
    engine.complete(req("b", [5], max_tokens=2), timeout=10)
    assert ("insert", 0) in engine.core.calls  # the freed slot 0 is taken again at once


def test_more_requests_than_slots_all_complete(engine):
    import threading
    results = {}

    def run(i):
        results[i] = engine.complete(req(f"r{i}", [i], max_tokens=3), timeout=20)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(8):
        assert text_of(results[i][0]) == f"<{i + 1}><{i + 2}><{i + 3}>"
    steps = [c[1] for c in engine.core.calls if c[0] == "step"]
    assert max(len(s) for s in steps) <= 4


def test_max_tokens_zero_scores_only(engine):
    deltas, usage = engine.complete(req("a", [4, 5, 6], max_tokens=0, echo=True), timeout=10)
    assert deltas[0].echo and [t.token_id for t in deltas[0].tokens] == [4, 5, 6]
    assert deltas[-1].finish_reason == "length"
    assert usage.completion_tokens == 0
    assert not any(c[0] in ("insert", "step") for c in engine.core.calls)


def test_best_of_returns_highest_mean_logprob(engine):
    # every candidate is the same arithmetic: ties keep candidate order; n=1 of best_of=2
    deltas, usage = engine.complete(req("a", [10], max_tokens=2, n=1, best_of=2), timeout=10)
    assert {d.index for d in deltas} == {0}
    assert text_of(deltas) == "<11><12>"


def test_validation_and_bounded_queue():
    eng = Engine(FakeCore(), ToyTokenizer(), max_waiting=2)  # not started: nothing drains
    with pytest.raises(ValueError, match="maximum context length is 64"):
        eng.submit(req("a", range(60), max_tokens=10), print)
    with pytest.raises(ValueError, match="empty"):
        eng.submit(req("a", [], max_tokens=1), print)
    eng.submit(req("a", [1]), print)
    eng.submit(req("b", [1]), print)
    with pytest.raises(QueueFull):
        eng.submit(req("c", [1]), print)


def test_abort_frees_the_slot(engine):
    import queue
    q = queue.Queue()
    engine.submit(req("long", [0], max_tokens=60, ignore_eos=True), q.put)
    first = q.get(timeout=10)
    assert first.text == "<1>"
    engine.abort("long")
    items = []
    while not (items and items[-1] is _END):
        items.append(q.get(timeout=10))
    assert len(items) < 60  # ended early, without a usage line
    assert not any(isinstance(i, Usage) for i in items)
    deltas, _ = engine.complete(req("next", [30], max_tokens=2), timeout=10)
    assert text_of(deltas) == "<31><32>"
    assert engine.active_slots == 0
