"""The warm path: step executables saved by one start are loaded by the next instead of compiled, give
the same outputs as compiled (and as the plain jitted steps), and a changed key or a damaged entry
compiles afresh. A background warm-up serves at once through the shapes every call can fall back to."""

import dataclasses
import logging

import pytest

from jaxserve.chat_template import end_of_turn_ids
from jaxserve.engine import bridge
from jaxserve.engine.build import build_engine
from jaxserve.engine.core import JaxCore
from jaxserve.engine.executables import ExecutableStore, key_text
from jaxserve.engine.types import Delta, EngineRequest, SamplingParams

SLOTS, CONTEXT = 2, 128  # few variants: one window, two row buckets


def generate(engine, n=2):
    """Greedy and seeded completions of two prompts at once: token ids and logprobs of each."""
    requests = [
        EngineRequest("greedy", (1, 5, 9, 13), max_tokens=8, sampling=SamplingParams(temperature=0.0)),
        EngineRequest("seeded", (2, 6, 10), max_tokens=8, seed=7, sampling=SamplingParams(temperature=0.8)),
    ][:n]
    out = {}
    for r in requests:
        deltas = [d for d in bridge.stream(engine, r) if isinstance(d, Delta)]
        out[r.request_id] = [(t.token_id, round(t.logprob, 5)) for d in deltas for t in d.tokens]
    return out


def engine(tiny, store, background=False):
    e = build_engine(tiny, slots=SLOTS, max_context=CONTEXT, warmup=False)
    e.core.report = e.core.warmup(store, background=background)
    return e


@pytest.fixture(scope="module")
def stored(tiny, tmp_path_factory):
    """A store filled by a cold start, and that start's outputs."""
    store = ExecutableStore(tmp_path_factory.mktemp("executables"))
    cold = engine(tiny, store)
    try:
        assert cold.core.report.loaded == 0 and cold.core.report.compiled > 0
        yield store, cold.core.report.compiled, generate(cold)
    finally:
        cold.shutdown()


def test_a_warm_start_loads_every_variant_and_traces_nothing(tiny, stored):
    store, count, outputs = stored
    assert len(list(store.folder.glob("*.exe"))) == count
    warm = engine(tiny, store)
    try:
        assert (warm.core.report.loaded, warm.core.report.compiled) == (count, 0)
        assert dict(warm.core.compiles) == {}  # nothing traced: the loaded executables serve
        assert generate(warm) == outputs
        assert dict(warm.core.compiles) == {}  # and no request reached a shape warm-up missed
    finally:
        warm.shutdown()


def test_a_warm_background_start_loads_the_fallbacks_first_then_the_rest(tiny, stored):
    store, count, outputs = stored
    warm = engine(tiny, store, background=True)
    try:
        assert 0 < warm.core.report.loaded < count and warm.core.report.compiled == 0
        warm.core.background.join(timeout=120)
        assert not warm.core._pending and dict(warm.core.compiles) == {}  # the rest loaded too, nothing traced
        assert generate(warm) == outputs
    finally:
        warm.shutdown()


def test_outputs_equal_the_plain_jitted_steps(tiny, stored):
    _, _, outputs = stored
    plain = build_engine(tiny, slots=SLOTS, max_context=CONTEXT, warmup=False)  # jit dispatch as shapes come
    try:
        assert generate(plain) == outputs
    finally:
        plain.shutdown()


def test_a_changed_key_compiles_afresh(tiny, stored):
    """Another end id or another matmul formulation changes the StepSpec: every variant's key differs,
    nothing stale is loaded."""
    store, count, _ = stored
    tok = tiny.tokenizer
    ends = tok.eos_ids + end_of_turn_ids(tok)  # as build_engine has them
    same = JaxCore(tiny, slots=SLOTS, cache_len=CONTEXT, eos_id=tok.eos_id, eos_ids=ends)
    assert sum(store.path(key_text(same.spec, v)).exists() for v in same.variants().values()) == count
    formulated = dataclasses.replace(tiny, cfg=dataclasses.replace(tiny.cfg, bf16_from_rows=1))
    for core in (
        JaxCore(tiny, slots=SLOTS, cache_len=CONTEXT, eos_id=tok.eos_id, eos_ids=(*ends, 3)),
        JaxCore(formulated, slots=SLOTS, cache_len=CONTEXT, eos_id=tok.eos_id, eos_ids=ends),
    ):
        assert not any(store.path(key_text(core.spec, v)).exists() for v in core.variants().values())


def test_a_damaged_or_mismatched_entry_is_compiled_not_used(tiny, stored, caplog, tmp_path):
    store, count, outputs = stored
    copy = ExecutableStore(tmp_path)
    files = sorted(store.folder.glob("*.exe"))
    for f in files:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / files[0].name).write_bytes(b"not an executable")
    (tmp_path / files[1].name).write_bytes(files[2].read_bytes())  # another key's entry under this name
    with caplog.at_level(logging.WARNING, logger="jaxserve.engine.executables"):
        e = engine(tiny, copy)
    try:
        assert (e.core.report.loaded, e.core.report.compiled) == (count - 2, 2)
        assert "failed to load" in caplog.text and "stored for another key" in caplog.text
        assert generate(e) == outputs
    finally:
        e.shutdown()


def test_a_background_warmup_serves_through_the_widest_shapes_then_every_one(tiny, stored):
    _, count, outputs = stored
    e = engine(tiny, None, background=True)  # no store: everything compiles
    try:
        assert e.core.report.compiled < count and e.core.background is not None
        early = generate(e)  # while (or after) the rest compile: wider shapes, the same tokens
        assert {k: [t for t, _ in v] for k, v in early.items()} == {k: [t for t, _ in v] for k, v in outputs.items()}
        e.core.background.join(timeout=600)
        assert not e.core.background.is_alive() and not e.core._pending
        compiles = dict(e.core.compiles)
        assert generate(e) == outputs
        assert dict(e.core.compiles) == compiles
    finally:
        e.shutdown()
