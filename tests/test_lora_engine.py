"""LoRA adapters in the engine, on the tiny model: each adapter's tokens and logprobs equal the same
engine serving the base weights merged with it; base and three adapters decoding in the same steps give
each request what it gives alone; loading, serving, unloading and reloading at run time compile
nothing; the prefix cache never shares a page between adapters."""

import dataclasses

import jax
import numpy as np
import pytest
from lora_files import merged, write_adapter
from test_engine import GREEDY, run_all, tokens_of

from jaxserve.device.build import build_engine
from jaxserve.engine.adapters import AdapterBusy, AdapterTableFull
from jaxserve.engine.bridge import complete
from jaxserve.engine.types import EngineRequest, RequestError, SamplingParams

RANKS = {"ra": 4, "rb": 8, "rc": 16}


@pytest.fixture(scope="module")
def adapter_dirs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {name: write_adapter(root / name, tiny.cfg, r, seed=r, std=0.15) for name, r in RANKS.items()}
    dirs["rd"] = write_adapter(root / "rd", tiny.cfg, 16, seed=99, std=0.15, targets=("q_proj", "down_proj"))
    return dirs


@pytest.fixture(scope="module")
def engine(tiny, adapter_dirs):
    loras = {name: str(adapter_dirs[name]) for name in RANKS}
    eng = build_engine(tiny, slots=4, max_context=128, loras=loras, max_loras=4, max_lora_rank=16)
    yield eng
    eng.shutdown()


def prompt_of(tiny, text: str) -> tuple[int, ...]:
    return tuple(tiny.tokenizer.encode(text))


def logprobs_of(deltas):
    return np.array([[t.logprob] + [lp for _, lp in t.top[:5]] for d in deltas if not d.echo for t in d.tokens])


def test_each_adapter_equals_its_merged_weights(tiny, engine, adapter_dirs):
    """Greedy tokens, their logprobs and the top 5 of every generated position under an adapter (rank 8 in a
    stack of rank 16) equal an engine serving the base weights merged with it (W + s * B @ A); the adapter
    changes the output. (tests/test_lora.py checks other ranks, targets, rsLoRA and dtypes at the model.)"""
    prompt = prompt_of(tiny, "The Lord is my shepherd; I shall not want. " * 8)[:90]  # two prefill chunks
    base, _ = complete(engine, EngineRequest("base", prompt, max_tokens=10, sampling=GREEDY), timeout=600)
    for name in ("rb",):
        got, _ = complete(engine, EngineRequest(name, prompt, 10, GREEDY, adapter=name), timeout=600)
        params = jax.device_put(merged(tiny.params, tiny.cfg, adapter_dirs[name]), tiny.param_shardings)
        reference = build_engine(dataclasses.replace(tiny, params=params), slots=2, max_context=128, warmup=False)
        try:
            want, _ = complete(reference, EngineRequest("merged", prompt, 10, GREEDY), timeout=600)
        finally:
            reference.shutdown()
        assert tokens_of(got) == tokens_of(want)
        np.testing.assert_allclose(logprobs_of(got), logprobs_of(want), atol=2e-4)
        assert np.abs(logprobs_of(got) - logprobs_of(base)).max() > 1e-2


def test_mixed_batch_gives_each_request_what_it_gives_alone(tiny, engine):
    """Base + three adapters, seeded sampling, submitted together (so prefilled packed in one call and
    decoded in the same steps): each gives the tokens it gives alone, and nothing compiles."""
    prompt = prompt_of(tiny, "It was the best of times, it was")
    sampling = SamplingParams(temperature=0.8, top_p=0.9)
    targets = [EngineRequest(f"t-{a}", prompt, 12, sampling, seed=7, adapter=a) for a in (None, *RANKS)]
    alone = {r.request_id: tokens_of(complete(engine, r, timeout=600)[0]) for r in targets}
    assert len({tuple(t) for t in alone.values()}) == 4  # each adapter samples something else
    compiles = dict(engine.core.compiles)
    results = run_all(engine, targets)
    for r in targets:
        assert tokens_of(results[r.request_id][0]) == alone[r.request_id]
    assert dict(engine.core.compiles) == compiles


def test_load_serve_unload_reload_at_run_time_compiles_nothing(tiny, engine, adapter_dirs):
    prompt = prompt_of(tiny, "Call me Ishmael.")
    compiles = dict(engine.core.compiles)
    engine.load_adapter("rd", str(adapter_dirs["rd"]))
    with pytest.raises(AdapterTableFull):
        engine.load_adapter("re", str(adapter_dirs["ra"]))
    first, _ = complete(engine, EngineRequest("rd1", prompt, 8, GREEDY, adapter="rd"), timeout=600)
    engine.unload_adapter("rd")
    with pytest.raises(RequestError, match="'rd' does not exist"):
        complete(engine, EngineRequest("gone", prompt, 8, GREEDY, adapter="rd"), timeout=600)
    engine.load_adapter("rd", str(adapter_dirs["ra"]))  # the same name, other weights
    assert tokens_of(complete(engine, EngineRequest("x", prompt, 8, GREEDY, adapter="rd"), timeout=600)[0]) == (
        tokens_of(complete(engine, EngineRequest("y", prompt, 8, GREEDY, adapter="ra"), timeout=600)[0])
    )
    engine.unload_adapter("rd")
    engine.load_adapter("rd", str(adapter_dirs["rd"]))
    again, _ = complete(engine, EngineRequest("rd2", prompt, 8, GREEDY, adapter="rd"), timeout=600)
    assert tokens_of(again) == tokens_of(first)
    assert dict(engine.core.compiles) == compiles
    engine.unload_adapter("rd")


def test_unloading_an_adapter_in_use_is_refused(tiny, engine):
    results = {}
    req = EngineRequest("long", prompt_of(tiny, "Once upon a time"), 100, GREEDY, adapter="ra", ignore_eos=True)
    engine.submit([req], lambda i, item: results.setdefault("items", []).append(item))
    with pytest.raises(AdapterBusy, match="'ra' has 1 request"):
        engine.unload_adapter("ra")
    engine.abort("long")


def test_prefix_cache_is_keyed_by_adapter():
    """On the fake core (pages of 4 tokens): a prompt's pages are found again by a request of the same
    adapter, never by the base's, another adapter's, or the same name loaded again."""
    from fake_core import FakeCore
    from test_scheduler import ToyTokenizer

    from jaxserve.engine.scheduler import Scheduler

    eng = Scheduler(FakeCore(), ToyTokenizer()).start()
    try:
        eng.load_adapter("a", "dir-a")
        eng.load_adapter("b", "dir-b")
        prompt = tuple(range(1, 14))  # three full pages

        def hits(adapter, rid):
            before = eng.pool.hit_tokens
            complete(eng, EngineRequest(rid, prompt, 2, GREEDY, adapter=adapter), timeout=60)
            return eng.pool.hit_tokens - before

        assert [hits("a", "1"), hits("a", "2"), hits(None, "3"), hits("b", "4"), hits(None, "5")] == [0, 12, 0, 0, 12]
        eng.unload_adapter("a")
        eng.load_adapter("a", "dir-b")
        assert hits("a", "6") == 0
    finally:
        eng.shutdown()
