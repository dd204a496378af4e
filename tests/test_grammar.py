"""Structured outputs through the real engine: every constrained choice parses and validates, at any
temperature and for n > 1; a set of EOS ids stops generation in the jitted steps."""

import json
import threading

import jsonschema
import pytest

from jaxserve.chat_template import encode_prompt, render
from jaxserve.engine.bridge import complete
from jaxserve.engine.build import build_engine
from jaxserve.engine.grammar import compile_response_format
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
    from jaxserve.engine.core import JaxCore
    from jaxserve.engine.scheduler import Scheduler

    prompt = tuple(tiny.tokenizer.encode("It was the best of times"))
    greedy = SamplingParams(temperature=0.0)
    plain = Scheduler(JaxCore(tiny, slots=2, cache_len=128, eos_id=None), tiny.tokenizer).start()
    try:
        deltas, _ = complete(plain, EngineRequest("a", prompt, max_tokens=8, sampling=greedy), timeout=300)
    finally:
        plain.shutdown()
    tokens = [t.token_id for d in deltas for t in d.tokens]
    end = tokens[2]
    assert end not in tokens[:2]
    core = JaxCore(tiny, slots=2, cache_len=128, eos_id=None, eos_ids=(end, 99999))
    assert core.eos_ids == (end, 99999)
    stopping = Scheduler(core, tiny.tokenizer).start()
    try:
        deltas, usage = complete(stopping, EngineRequest("b", prompt, max_tokens=8, sampling=greedy), timeout=300)
    finally:
        stopping.shutdown()
    assert [t.token_id for d in deltas for t in d.tokens] == tokens[:2]
    assert deltas[-1].finish_reason == "stop" and usage.completion_tokens == 3


@pytest.mark.slow
def test_a_constrained_choice_is_the_same_alone_and_in_a_crowd(engine, smollm2):
    """Seeded draws depend only on the sequence's own key stream and mask: a constrained request gives the
    same tokens alone and beside other constrained and unconstrained ones (the loop's syncing changes
    when the host works, not what is sampled)."""
    tok = smollm2.tokenizer
    grammar = compile_response_format(
        {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["person"]}}, tok
    )
    prompt = chat_ids(tok, "A person as JSON.")

    def target():
        return EngineRequest(
            "t", prompt, max_tokens=80, sampling=SamplingParams(temperature=1.0), seed=11, grammar=grammar
        )

    alone, _ = complete(engine, target(), timeout=600)
    crowd = [target()] + [
        EngineRequest(
            f"o{i}", chat_ids(tok, f"Story {i}"), max_tokens=20 + 7 * i, seed=i, grammar=grammar if i % 2 else None
        )
        for i in range(6)
    ]
    together = run_all(engine, crowd)["t"][0]
    ids = lambda deltas: [t.token_id for d in deltas for t in d.tokens]
    assert ids(together) == ids(alone)
