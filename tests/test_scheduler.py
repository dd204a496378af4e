"""The scheduler against a fake core whose arithmetic is checkable by hand (see fake_core.py)."""

import queue
import threading
import time

import pytest
from fake_core import FakeCore

from jaxserve.engine.bridge import complete
from jaxserve.engine.contract import Runner
from jaxserve.engine.lifecycle import END
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.types import EngineRequest, EngineStopped, QueueFull, RequestError, SamplingParams, Usage


class ToyTokenizer:
    """Token t is the text '<t>'."""

    def token_bytes(self, t):
        return f"<{t}>".encode()

    def decode(self, ids):
        return "".join(f"<{t}>" for t in ids)


@pytest.fixture
def engine():
    eng = Scheduler(FakeCore(), ToyTokenizer(), max_waiting=8).start()
    yield eng
    eng.shutdown()


def req(rid, prompt, **kw):
    return EngineRequest(rid, tuple(prompt), sampling=SamplingParams(temperature=0.0), **kw)


def text_of(deltas, index=0):
    return "".join(d.text for d in deltas if d.index == index and not d.echo)


def test_tokens_follow_the_arithmetic(engine):
    deltas, usage = complete(engine, req("a", [3, 7], max_tokens=4), timeout=10)
    assert text_of(deltas) == "<8><9><10><11>"
    assert deltas[-1].finish_reason == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, 4)


def test_eos_finishes_with_stop_and_is_not_text(engine):
    deltas, usage = complete(engine, req("a", [47], max_tokens=10), timeout=10)
    assert text_of(deltas) == "<48><49>"
    assert deltas[-1].finish_reason == "stop"
    assert usage.completion_tokens == 3  # the EOS token counts as generated
    deltas, _ = complete(engine, req("b", [47], max_tokens=4, ignore_eos=True), timeout=10)
    assert text_of(deltas) == "<48><49><50><51>"


def test_stop_string_releases_the_slot(engine):
    deltas, _ = complete(engine, req("a", [1], max_tokens=20, stop=("<5>",)), timeout=10)
    assert text_of(deltas) == "<2><3><4>"
    assert deltas[-1].finish_reason == "stop"
    complete(engine, req("b", [1], max_tokens=1), timeout=10)  # the next plan releases the slot, then reuses it
    calls = engine.core.calls
    inserts = [i for i, call in enumerate(calls) if call == ("insert", 0)]
    assert len(inserts) == 2 and inserts[0] < calls.index(("release", 0)) < inserts[1]


def test_long_prompt_is_prefilled_in_chunks(engine):
    deltas, _ = complete(engine, req("a", range(10), max_tokens=1, echo=True), timeout=10)
    prefills = [c for c in engine.core.calls if c[0] == "prefill"]
    assert prefills == [("prefill", ((0, 0, 4),)), ("prefill", ((0, 4, 4),)), ("prefill", ((0, 8, 2),))]
    echo = deltas[0]
    assert echo.echo and echo.text == "".join(f"<{t}>" for t in range(10))
    assert echo.tokens[0].logprob is None
    assert [t.logprob for t in echo.tokens[1:]] == [-t / 100.0 for t in range(1, 10)]
    assert text_of(deltas) == "<10>"


def test_short_prompts_waiting_together_share_one_prefill():
    eng = Scheduler(FakeCore(), ToyTokenizer())
    queues = [queue.Queue() for _ in range(4)]
    for i, q in enumerate(queues[:3]):
        eng.submit(
            [req(f"s{i}", [10 * i + 1, 10 * i + 2], max_tokens=2, echo=i == 1)], lambda _, item, q=q: q.put(item)
        )
    eng.submit(
        [req("long", [7, 7, 7], max_tokens=2)], lambda _, item: queues[3].put(item)
    )  # too long to pack: its own call (as costly as the others, so admitted after them)
    eng.start()
    try:
        for i, q in enumerate(queues):
            items = []
            while not items or items[-1] is not END:
                items.append(q.get(timeout=10))
            deltas = [d for d in items if hasattr(d, "echo")]
            want = "<8><9>" if i == 3 else f"<{10 * i + 3}><{10 * i + 4}>"
            assert text_of(deltas) == want
            if i == 1:  # echo from a packed row: its own targets
                assert deltas[0].echo and [t.logprob for t in deltas[0].tokens] == [None, -0.12]
        prefills = [c for c in eng.core.calls if c[0] == "prefill"]
        assert prefills[0] == ("prefill", ((0, 0, 2), (1, 0, 2), (2, 0, 2)))
        assert prefills[1] == ("prefill", ((3, 0, 3),))
    finally:
        eng.shutdown()


def test_n_shares_one_prefill_and_slots_are_reused(engine):
    deltas, usage = complete(engine, req("a", [20], max_tokens=3, n=3), timeout=10)
    assert [c[0] for c in engine.core.calls].count("prefill") == 1
    copies = [c for c in engine.core.calls if c[0] == "copy_page"]  # the prompt's partial page, once per choice
    assert len(copies) == 2 and len({c[2] for c in copies}) == 2 and {c[1] for c in copies} == {copies[0][1]}
    for i in range(3):
        assert text_of(deltas, i) == "<21><22><23>"
    assert usage.completion_tokens == 9
    engine.core.calls.clear()
    complete(engine, req("b", [5], max_tokens=2), timeout=10)
    assert ("insert", 0) in engine.core.calls  # the freed slot 0 is taken again at once


def test_more_requests_than_slots_all_complete(engine):
    results = {}

    def run(i):
        results[i] = complete(engine, req(f"r{i}", [i], max_tokens=3), timeout=20)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(8):
        assert text_of(results[i][0]) == f"<{i + 1}><{i + 2}><{i + 3}>"
    steps = [c[1] for c in engine.core.calls if c[0] == "forward"]
    assert max(len(s) for s in steps) <= 4


def test_max_tokens_zero_scores_only(engine):
    deltas, usage = complete(engine, req("a", [4, 5, 6], max_tokens=0, echo=True), timeout=10)
    assert deltas[0].echo and [t.token_id for t in deltas[0].tokens] == [4, 5, 6]
    assert deltas[-1].finish_reason == "length"
    assert usage.completion_tokens == 0
    assert not any(c[0] in ("insert", "forward", "sample") for c in engine.core.calls)


def test_best_of_returns_highest_mean_logprob(engine):
    # every candidate is the same arithmetic: ties keep candidate order; n=1 of best_of=2
    deltas, usage = complete(engine, req("a", [10], max_tokens=2, n=1, best_of=2), timeout=10)
    assert {d.index for d in deltas} == {0}
    assert text_of(deltas) == "<11><12>"


def test_validation_and_bounded_queue():
    eng = Scheduler(FakeCore(), ToyTokenizer(), max_waiting=2)  # not started: nothing drains
    with pytest.raises(RequestError, match="maximum context length is 64") as e:
        eng.submit([req("a", range(60), max_tokens=10)], print)
    assert (e.value.param, e.value.code) == ("prompt", "context_length_exceeded")
    with pytest.raises(RequestError, match="empty"):
        eng.submit([req("a", [], max_tokens=1)], print)
    with pytest.raises(RequestError, match="at most 4") as e:
        eng.submit([req("a", [1], n=2, best_of=5)], print)
    assert e.value.param == "best_of"
    eng.submit([req("a", [1])], print)
    eng.submit([req("b", [1])], print)
    with pytest.raises(QueueFull):
        eng.submit([req("c", [1])], print)


def test_abort_frees_the_slot(engine):
    q = queue.Queue()
    engine.submit([req("long", [0], max_tokens=60, ignore_eos=True)], lambda _, item: q.put(item))
    first = q.get(timeout=10)
    assert first.text == "<1>"
    engine.abort("long")
    items = []
    while not (items and items[-1] is END):
        items.append(q.get(timeout=10))
    assert len(items) < 60  # ended early, without a usage line
    assert not any(isinstance(i, Usage) for i in items)
    deltas, _ = complete(engine, req("next", [30], max_tokens=2), timeout=10)
    assert text_of(deltas) == "<31><32>"
    assert engine.active_slots == 0


def test_the_fake_implements_the_device_contract():
    assert isinstance(FakeCore(), Runner)  # its signatures are checked against Runner by mypy in CI


def test_requests_submitted_together_are_queued_all_or_none():
    eng = Scheduler(FakeCore(), ToyTokenizer(), max_waiting=3)  # not started: nothing drains
    with pytest.raises(RequestError):
        eng.submit([req("a", [1]), req("b", [])], print)
    assert eng.queue_depth == 0
    eng.submit([req("first", [1])], print)
    with pytest.raises(QueueFull):
        eng.submit([req(f"r{i}", [1]) for i in range(3)], print)
    assert eng.queue_depth == 1
    eng.submit([req(f"r{i}", [1]) for i in range(2)], print)
    assert eng.queue_depth == 3


class BrokenCore(FakeCore):
    def forward(self, table, max_position, max_slot):
        raise RuntimeError("device lost")


def test_an_engine_failure_ends_open_requests_and_refuses_new_ones():
    eng = Scheduler(BrokenCore(), ToyTokenizer()).start()
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            complete(eng, req("a", [1], max_tokens=5), timeout=10)
        with pytest.raises(EngineStopped, match="device lost"):  # refused at once, never queued to hang
            complete(eng, req("b", [1], max_tokens=5), timeout=10)
        assert not eng.healthy
    finally:
        eng.shutdown()


def test_items_of_requests_submitted_together_come_tagged_with_their_index(engine):
    items = queue.Queue()
    engine.submit([req("a", [1], max_tokens=2), req("b", [10], max_tokens=1)], lambda i, item: items.put((i, item)))
    got, ended = {0: "", 1: ""}, 0
    while ended < 2:
        i, item = items.get(timeout=10)
        if item is END:
            ended += 1
        elif hasattr(item, "text"):
            got[i] += item.text
    assert got == {0: "<2><3>", 1: "<11>"}


def test_more_prompts_than_the_waiting_bound_is_a_request_error():
    eng = Scheduler(FakeCore(), ToyTokenizer(), max_waiting=2)  # idle, not started
    with pytest.raises(RequestError, match="at most 2 prompts") as e:
        eng.submit([req(f"r{i}", [1]) for i in range(3)], print)
    assert e.value.param == "prompt" and eng.queue_depth == 0  # never retryable, so never QueueFull


class Recorder:
    """Every request's items in the order they came, across requests: (name, item)."""

    def __init__(self):
        self.items = queue.Queue()
        self.log = []

    def emit(self, name):
        return lambda _, item: self.items.put((name, item))

    def until_ended(self, names, timeout=10):
        ended = set()
        while not set(names) <= ended:
            name, item = self.items.get(timeout=timeout)
            self.log.append((name, item))
            if item is END:
                ended.add(name)

    def first_token(self, name):
        return next(i for i, (n, item) in enumerate(self.log) if n == name and getattr(item, "tokens", None))


def test_a_one_token_request_overtakes_waiting_n4_requests():
    # 4 slots. "big" (n=4, 20 tokens each) holds every slot; then "b2" (n=4, cost 4 x 20 = 80 slot-steps)
    # and "small" (n=1, 1 token, cost 1) wait. When big's slots free, small goes first although it came last.
    eng = Scheduler(FakeCore(), ToyTokenizer()).start()
    rec = Recorder()
    try:
        eng.submit([req("big", [0], max_tokens=20, n=4, ignore_eos=True)], rec.emit("big"))
        name, first = rec.items.get(timeout=10)
        rec.log.append((name, first))
        eng.submit([req("b2", [0], max_tokens=20, n=4, ignore_eos=True)], rec.emit("b2"))
        eng.submit([req("small", [9], max_tokens=1)], rec.emit("small"))
        rec.until_ended(["big", "b2", "small"])
        small_end = rec.log.index(("small", END))
        assert small_end < rec.first_token("b2")  # small was admitted, and done, before b2 started
        assert text_of([item for n, item in rec.log if n == "small" and hasattr(item, "text")]) == "<10>"
    finally:
        eng.shutdown()


def test_an_overtaken_request_becomes_a_barrier():
    # max_overtakes 2: while "big" (all 4 slots) runs, "wide" (n=4) and then six 1-token requests wait.
    # When big ends: s0 and s1 overtake wide (twice); wide is now a barrier: it needs 4 slots, 2 are free,
    # so nothing else is admitted; s0 and s1 finish, wide gets all 4 slots, and s2..s5 run only after it.
    eng = Scheduler(FakeCore(), ToyTokenizer(), max_overtakes=2).start()
    rec = Recorder()
    smalls = [f"s{i}" for i in range(6)]
    try:
        eng.submit([req("big", [0], max_tokens=10, n=4, ignore_eos=True)], rec.emit("big"))
        name, first = rec.items.get(timeout=10)
        rec.log.append((name, first))
        eng.submit([req("wide", [20], max_tokens=3, n=4)], rec.emit("wide"))
        for i, name in enumerate(smalls):
            eng.submit([req(name, [30 + i], max_tokens=1)], rec.emit(name))
        rec.until_ended(["big", "wide", *smalls])
        wide_first, wide_end = rec.first_token("wide"), rec.log.index(("wide", END))
        assert all(rec.log.index((s, END)) < wide_first for s in smalls[:2])
        assert all(rec.first_token(s) > wide_end for s in smalls[2:])
    finally:
        eng.shutdown()


def test_a_request_past_its_deadline_is_aborted_and_frees_its_slots():
    from jaxserve.engine.types import DeadlineExceeded

    eng = Scheduler(FakeCore(), ToyTokenizer()).start()
    rec = Recorder()
    try:
        # running: 4 slots held, each step takes the fake's 2 ms, the deadline comes long before 60 tokens
        eng.submit(
            [req("run", [0], max_tokens=60, n=4, ignore_eos=True, deadline=time.monotonic() + 0.05)], rec.emit("run")
        )
        # waiting: needs a slot that "run" holds, and its deadline has already passed
        eng.submit([req("wait", [0], max_tokens=1, deadline=time.monotonic() - 1)], rec.emit("wait"))
        rec.until_ended(["run", "wait"])
        errors = {n: item for n, item in rec.log if isinstance(item, BaseException)}
        assert isinstance(errors["wait"], DeadlineExceeded) and errors["wait"].queued
        assert isinstance(errors["run"], DeadlineExceeded) and not errors["run"].queued
        assert not any(isinstance(item, Usage) for _, item in rec.log)
        assert sum(1 for n, item in rec.log if n == "run" and getattr(item, "tokens", None)) < 4 * 60
        assert eng.active_slots == 0
        deltas, _ = complete(eng, req("next", [30], max_tokens=2), timeout=10)
        assert text_of(deltas) == "<31><32>"
    finally:
        eng.shutdown()


class StrideMatcher:
    """A grammar stand-in: the first token even, then each token 2 more than the last. Its mask depends on
    the token just taken, so a mask written a step late shows in the output. Records every token."""

    seen: list = []

    def __init__(self, tokenizer, grammar, vocab):
        assert grammar == "stride" and vocab == 64
        self.tokens = []
        StrideMatcher.seen.append(self.tokens)

    def consume(self, token):
        self.tokens.append(token)

    def mask(self):
        import numpy as np

        allowed = range(0, 64, 2) if not self.tokens else [self.tokens[-1] + 2]
        bits = np.zeros(64, np.uint64)
        bits[list(allowed)] = 1
        words = [int(sum(int(b) << i for i, b in enumerate(bits[w * 32 : w * 32 + 32]))) for w in range(2)]
        return np.array(words, np.uint32).view(np.int32)


def run_beside(engine, monkeypatch, reqs):
    """Submit `reqs` together (a StrideMatcher for grammar "stride"); every item they emit is also logged
    into the fake's calls as ("emit", index, item), so it shows where the host's text work happened."""
    import jaxserve.engine.scheduler as scheduler_module

    StrideMatcher.seen = []
    monkeypatch.setattr(scheduler_module, "Matcher", StrideMatcher)
    calls, items = engine.core.calls, queue.Queue()

    def emit(i, item):
        calls.append(("emit", i, item))
        items.put((i, item))

    engine.submit(reqs, emit)
    ended, deltas = set(), {i: [] for i in range(len(reqs))}
    while len(ended) < len(reqs):
        i, item = items.get(timeout=10)
        if item is END:
            ended.add(i)
        elif hasattr(item, "text"):
            deltas[i].append(item)
    return [deltas[i] for i in range(len(reqs))]


def test_a_constrained_choice_follows_masks_written_between_the_step_halves(engine, monkeypatch):
    """Stride masks keep the fake's +1 arithmetic to 3 -> 4, 6, 8, 10: each step samples under the mask of
    the token fetched just before (a stale mask would repeat a token). The mask is written after the
    step's forward half and before its sampling half; the unconstrained request beside it keeps the plain
    arithmetic."""
    constrained, free = run_beside(
        engine, monkeypatch, [req("c", [3], max_tokens=4, grammar="stride"), req("f", [20], max_tokens=4)]
    )
    assert text_of(constrained) == "<4><6><8><10>"
    assert text_of(free) == "<21><22><23><24>"
    assert StrideMatcher.seen == [[4, 6, 8, 10]]
    calls = engine.core.calls
    masked = [i for i, c in enumerate(calls) if c[0] == "set_masks"]
    assert len(masked) == 3  # after the insert and after each step but the last (its token ended the choice)
    for i in masked:
        assert calls[i + 1][0] == "sample"
        assert [c[0] for c in calls[:i] if c[0] in ("forward", "sample")][-1] == "forward"


def test_the_host_waits_for_a_step_only_once_the_next_is_dispatched(engine, monkeypatch):
    """With a constrained choice decoding (a mask to write every step) as without: the host fetches step
    k-1 only after dispatching step k's forward half, and does its text work (deltas) only after step k's
    sampling half is dispatched, so the device always has the next step while the host works."""
    for grammar in ("stride", None):
        engine.core.calls.clear()
        run_beside(engine, monkeypatch, [req("c", [3], max_tokens=6, grammar=grammar), req("f", [20], max_tokens=6)])
        calls = engine.core.calls
        fetches = [i for i, c in enumerate(calls) if c[0] == "fetch"]
        assert len(fetches) == 5  # the 5 steps after the inserts: none past the last token (see below)
        for i in fetches[:-1]:
            sampled = calls[i][1]
            assert "forward" in [c[0] for c in calls[sampled + 1 : i]]
            after = [c[0] for c in calls[i + 1 :] if c[0] != "set_masks"]
            assert after[0] == "sample"  # no delta in between


def test_no_step_is_dispatched_past_the_token_budget(engine, monkeypatch):
    """A request of max_tokens=k runs its insert and k - 1 steps: the step that would follow its last token
    (dispatched before the host has seen that token) is never dispatched, so the next request starts at
    once. Two requests of different budgets side by side: steps stop with the longer one."""
    for budgets in ([4], [3, 6]):
        engine.core.calls.clear()
        run_beside(engine, monkeypatch, [req(f"r{k}", [10 * i], max_tokens=k) for i, k in enumerate(budgets)])
        samples = [c[1] for c in engine.core.calls if c[0] == "sample"]
        assert len(samples) == max(budgets) - 1
        assert all(samples)  # every step dispatched had an active slot


def test_the_first_token_is_delivered_before_the_next_step_is_dispatched(engine, monkeypatch):
    """The first token comes from the insert; it is emitted before the step that computes the second one
    is dispatched, so its delivery does not share the device with that step. Later tokens stay one step
    late (the host's text work overlaps the next step)."""
    engine.core.calls.clear()
    run_beside(engine, monkeypatch, [req("a", [3], max_tokens=3)])
    kinds = [c[0] if c[0] != "emit" else ("emit", getattr(c[2], "text", None)) for c in engine.core.calls]
    first = kinds.index(("emit", "<4>"))
    assert kinds.index("insert") < first < kinds.index("forward")
    second = kinds.index(("emit", "<5>"))
    assert [k for k in kinds[:second] if k in ("forward", "sample")] == ["forward", "sample"] * 2
