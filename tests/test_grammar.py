"""Structured outputs through the real engine: every constrained choice parses and validates, at any
temperature and for n > 1; a set of EOS ids stops generation in the jitted steps."""

import json
import queue
import threading

import jsonschema
import pytest

from jaxserve.chat_template import encode_prompt, render
from jaxserve.device.build import build_engine
from jaxserve.engine.bridge import complete
from jaxserve.engine.grammar import compile_response_format
from jaxserve.engine.lifecycle import END
from jaxserve.engine.types import EngineRequest, RequestError, SamplingParams

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
            "where": {
                "type": "object",
                "properties": {
                    "lat": {"type": "integer", "minimum": -90, "maximum": 90},
                    "lon": {"type": "integer", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["city", "tags", "where"],
        "additionalProperties": False,
    },
    "list": {"type": "array", "items": {"type": "integer", "enum": [1, 2, 3]}, "maxItems": 4},
}


@pytest.fixture(scope="module")
def engine(smollm2):
    eng = build_engine(smollm2, slots=16, max_context=512)
    yield eng
    eng.shutdown()


def chat_ids(tok, text):
    return tuple(encode_prompt(tok, render(tok, [{"role": "user", "content": text}])))


def run_all(engine, reqs):
    results = {}

    def run(r):
        results[r.request_id] = complete(engine, r, timeout=600)

    threads = [threading.Thread(target=run, args=(r,)) for r in reqs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


@pytest.mark.slow
def test_every_constrained_output_validates(engine, smollm2):
    """Three schemas (nesting, enums, arrays, required and optional fields, a string pattern) at temperature
    0, 1 and 1.5, n = 2, all running at once beside an unconstrained request: every choice that ends by
    itself (finish_reason stop) parses and validates."""
    tok = smollm2.tokenizer
    reqs, schemas = [], {}
    for name, schema in SCHEMAS.items():
        grammar = compile_response_format({"type": "json_schema", "json_schema": {"name": name, "schema": schema}}, tok)
        for temperature in (0.0, 1.0, 1.5):
            rid = f"{name}-{temperature}"
            schemas[rid] = schema
            reqs.append(
                EngineRequest(
                    rid,
                    chat_ids(tok, f"Give me a {name} as JSON."),
                    max_tokens=200,
                    sampling=SamplingParams(temperature=temperature),
                    seed=7,
                    n=2,
                    grammar=grammar,
                )
            )
    reqs.append(EngineRequest("free", chat_ids(tok, "Say hello."), max_tokens=30, seed=1))
    results = run_all(engine, reqs)
    for rid, schema in schemas.items():
        deltas, _ = results[rid]
        for index in (0, 1):
            text = "".join(d.text for d in deltas if d.index == index)
            reason = [d.finish_reason for d in deltas if d.index == index and d.finish_reason][0]
            assert reason == "stop", (rid, text)
            jsonschema.validate(json.loads(text), schema)
    assert [d.finish_reason for d in results["free"][0] if d.finish_reason] in (["stop"], ["length"])


@pytest.mark.slow
def test_json_object_gives_an_object(engine, smollm2):
    tok = smollm2.tokenizer
    grammar = compile_response_format({"type": "json_object"}, tok)
    deltas, _ = complete(
        engine,
        EngineRequest("o", chat_ids(tok, "A JSON object about cats"), max_tokens=120, seed=3, grammar=grammar),
        timeout=600,
    )
    if deltas[-1].finish_reason == "stop":
        assert isinstance(json.loads("".join(d.text for d in deltas)), dict)
    else:
        assert "".join(d.text for d in deltas).startswith("{")


def test_a_schema_llguidance_refuses_names_response_format(smollm2):
    with pytest.raises(RequestError) as e:
        compile_response_format(
            {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/missing"}}}, smollm2.tokenizer
        )
    assert e.value.param == "response_format"
    with pytest.raises(RequestError) as e:
        compile_response_format({"type": "xml"}, smollm2.tokenizer)
    assert e.value.param == "response_format"


def test_any_id_of_the_eos_set_stops_in_the_jitted_steps(tiny):
    """The tiny model's greedy continuation, then the same with its 3rd generated token declared an end id:
    generation stops right there, on device (finish_reason stop, 3 tokens counted, none of it as text)."""
    from jaxserve.device.runner import JaxRunner
    from jaxserve.engine.scheduler import Scheduler

    prompt = tuple(tiny.tokenizer.encode("It was the best of times"))
    greedy = SamplingParams(temperature=0.0)
    plain = Scheduler(JaxRunner(tiny, slots=2, cache_len=128, eos_id=None), tiny.tokenizer).start()
    try:
        deltas, _ = complete(plain, EngineRequest("a", prompt, max_tokens=8, sampling=greedy), timeout=300)
    finally:
        plain.shutdown()
    tokens = [t.token_id for d in deltas for t in d.tokens]
    end = tokens[2]
    assert end not in tokens[:2]
    core = JaxRunner(tiny, slots=2, cache_len=128, eos_id=None, eos_ids=(end, 99999))
    assert core.eos_ids == (end, 99999)
    stopping = Scheduler(core, tiny.tokenizer).start()
    try:
        deltas, usage = complete(stopping, EngineRequest("b", prompt, max_tokens=8, sampling=greedy), timeout=300)
    finally:
        stopping.shutdown()
    assert [t.token_id for d in deltas for t in d.tokens] == tokens[:2]
    assert deltas[-1].finish_reason == "stop" and usage.completion_tokens == 3


@pytest.mark.slow
def test_a_mixed_batch_gives_each_request_what_it_gives_alone(engine, smollm2):
    """Seeded draws depend only on the sequence's own key stream and mask: constrained and unconstrained
    requests (temperature 1) decoding together give the same tokens as each alone (masks are written
    between a step's halves: that changes when the host works, not what is sampled), and the constrained
    ones validate.

    Every run computes the same shapes, since XLA:CPU's rounding depends on a matmul's row count, which
    would flip a rare near-tie draw for reasons that have nothing to do with the loop: an 8-choice filler
    holds slots 0-7 while the requests are inserted (so decode steps always take 16 rows), and every prompt
    is too long to be packed with another (so each is prefilled alone, in one chunk of the same bucket)."""
    tok = smollm2.tokenizer
    schema = SCHEMAS["person"]
    grammar = compile_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}, tok)
    notes = "Notes from the archive. " + " ".join(
        f"Entry {i} mentions a harbour, a lighthouse and a cart of apples." for i in range(7)
    )
    sampling = SamplingParams(temperature=1.0)
    reqs = [
        EngineRequest(
            f"r{i}",
            chat_ids(tok, notes + (" A person as JSON." if i % 2 == 0 else f" Story {i}")),
            max_tokens=80 if i % 2 == 0 else 20 + 7 * i,
            sampling=sampling,
            seed=11 + i,
            grammar=grammar if i % 2 == 0 else None,
        )
        for i in range(5)
    ]
    assert all(128 < len(r.prompt_ids) and len(r.prompt_ids) + r.max_tokens <= 256 for r in reqs)

    def beside_filler(batch):
        items = queue.Queue()
        filler = EngineRequest(
            "filler", chat_ids(tok, notes + " Count."), max_tokens=100, sampling=sampling, seed=5, n=8, ignore_eos=True
        )
        engine.submit([filler], lambda _, item: items.put(item))
        while not getattr(items.get(timeout=600), "tokens", None):
            pass  # until the filler decodes in slots 0-7
        results = run_all(engine, batch)
        engine.abort("filler")
        while items.get(timeout=600) is not END:
            pass
        return results

    ids = lambda deltas: [t.token_id for d in deltas for t in d.tokens]
    alone = {r.request_id: ids(beside_filler([r])[r.request_id][0]) for r in reqs}
    results = beside_filler(reqs)
    assert {rid: ids(deltas) for rid, (deltas, _) in results.items()} == alone
    for r in reqs[::2]:
        deltas, _ = results[r.request_id]
        assert deltas[-1].finish_reason == "stop"
        jsonschema.validate(json.loads("".join(d.text for d in deltas)), schema)
