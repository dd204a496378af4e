"""Tool calling through the official `openai` client against a real SmolLM2 server on 127.0.0.1: an agent
round trip, a named tool, parallel calls, a stream assembled equal to the unstreamed answer, arguments that
validate against ten schemas at temperature 1 (a batch line with tools is in test_batch.py). SmolLM2's
template takes no tools, so these run on the Hermes fallback prompt, and the grammar keeps every required
call well formed."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import test_chat

SMOL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow
smol_server, client = test_chat.smol_server, test_chat.client  # the chat tests' fixtures: a server per module


def fn(name: str, description: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


WEATHER = fn(
    "get_weather",
    "Get the current weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
)
TIME = fn(
    "get_time",
    "Get the current time in a time zone",
    {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}}, "required": ["zone"]},
)


def _args(call, tool: dict) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_an_agent_round_trip(client):
    """required: the model calls; the result goes back as a tool message; the model answers in text."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(
        model=SMOL, messages=messages, tools=[WEATHER, TIME], tool_choice="required", max_tokens=80, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert "Paris" in _args(call, WEATHER)["city"]
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'},
    ]
    answer = client.chat.completions.create(
        model=SMOL, messages=messages, tools=[WEATHER, TIME], tool_choice="none", max_tokens=30, temperature=0
    )
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content


def test_a_named_tool_and_the_stream_assembled_equal(client):
    """A named function: its call, finish_reason "stop" as OpenAI's, logprobs of the tokens that wrote it;
    streamed, the call comes as OpenAI's deltas (index, id, type and name first, then the arguments),
    assembling to the unstreamed answer."""
    kwargs = dict(
        model=SMOL,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=80,
        temperature=0,
        logprobs=True,
    )
    want = client.chat.completions.create(**kwargs).choices[0]
    assert want.finish_reason == "stop" and [c.function.name for c in want.message.tool_calls] == ["get_time"]
    _args(want.message.tool_calls[0], TIME)
    written = "".join(t.token for t in want.logprobs.content)
    assert written.startswith('<tool_call>\n{"name":"get_time","arguments":')
    assert want.message.tool_calls[0].function.arguments in written
    calls: dict[int, dict] = {}
    content, finish, tokens = "", None, []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        tokens += chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
        for c in delta.tool_calls or ():
            if c.id:
                assert c.type == "function" and c.function.name and c.index not in calls
                calls[c.index] = {"name": c.function.name, "arguments": c.function.arguments or ""}
            else:
                calls[c.index]["arguments"] += c.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert content == "" and finish == "stop" and [t.token for t in tokens] == [t.token for t in want.logprobs.content]
    assert [calls[i] for i in sorted(calls)] == [c.function.model_dump() for c in want.message.tool_calls]


def test_parallel_calls(client):
    r = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=160,
        temperature=0,
    )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) >= 2
    assert len({c.id for c in calls}) == len(calls)
    for c in calls:
        _args(c, {"get_weather": WEATHER, "get_time": TIME}[c.function.name])


SCHEMAS = [
    fn(
        "add",
        "Add two integers",
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
    ),
    fn(
        "set_light",
        "Switch a light",
        {
            "type": "object",
            "properties": {"room": {"enum": ["kitchen", "hall"]}, "on": {"type": "boolean"}},
            "required": ["room", "on"],
        },
    ),
    fn(
        "tag",
        "Tag a photo",
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}
            },
            "required": ["tags"],
        },
    ),
    fn(
        "book",
        "Book a table",
        {
            "type": "object",
            "properties": {
                "party": {
                    "type": "object",
                    "properties": {
                        "size": {"type": "integer", "minimum": 1, "maximum": 12},
                        "name": {"type": "string", "maxLength": 20},
                    },
                    "required": ["size", "name"],
                },
                "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
            },
            "required": ["party", "time"],
        },
    ),
    fn(
        "search",
        "Search the web",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 40},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10},
            },
            "required": ["query"],
        },
    ),
    fn(
        "convert",
        "Convert an amount",
        {
            "type": "object",
            "properties": {
                "amount": {"type": "number", "minimum": 0},
                "from": {"enum": ["EUR", "USD", "JPY"]},
                "to": {"enum": ["EUR", "USD", "JPY"]},
            },
            "required": ["amount", "from", "to"],
            "additionalProperties": False,
        },
    ),
    fn("no_args", "Ring the bell", {"type": "object", "properties": {}}),
    fn(
        "route",
        "Plan a route",
        {
            "type": "object",
            "properties": {
                "stops": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 20},
                            "nights": {"type": "integer", "minimum": 0, "maximum": 9},
                        },
                        "required": ["city"],
                    },
                    "minItems": 2,
                    "maxItems": 3,
                }
            },
            "required": ["stops"],
        },
    ),
    fn(
        "rate",
        "Rate a film",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 30},
                "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                "review": {"type": ["string", "null"], "maxLength": 40},
            },
            "required": ["title", "stars"],
        },
    ),
    fn(
        "remind",
        "Set a reminder",
        {
            "type": "object",
            "properties": {
                "text": {"type": "string", "maxLength": 30},
                "when": {
                    "anyOf": [{"type": "integer", "minimum": 0, "maximum": 1440}, {"enum": ["tomorrow", "tonight"]}]
                },
            },
            "required": ["text", "when"],
        },
    ),
]


def test_arguments_validate_against_ten_schemas_at_temperature_1(client):
    """Every constrained call parses, its arguments validate and it ends (the objects open, as clients write
    them: the grammar closes them), at temperature 1 with n 2 (ten requests at once, so they decode together)."""

    def ask(tool: dict):
        return client.chat.completions.create(
            model=SMOL,
            messages=[
                {"role": "user", "content": f"Use {tool['function']['name']}: {tool['function']['description']}."}
            ],
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": tool["function"]["name"]}},
            max_tokens=120,
            temperature=1.0,
            n=2,
        )

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        answers = list(pool.map(ask, SCHEMAS))
    for tool, r in zip(SCHEMAS, answers):
        assert [c.index for c in r.choices] == [0, 1]
        for c in r.choices:
            assert c.finish_reason == "stop", (tool["function"]["name"], c.message.content)
            assert c.message.tool_calls is not None, (tool["function"]["name"], c.message.content)
            (call,) = c.message.tool_calls
            assert call.function.name == tool["function"]["name"]
            _args(call, tool)


def test_refusals_name_the_parameter(smol_server):
    def post(**body):
        base = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(smol_server.url + "/v1/chat/completions", json={**base, **body}, timeout=60)

    bad_schema = fn("x", "x", {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    for body, param in (
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [bad_schema], "tool_choice": "required"}, "tools"),
        ({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "18 C"}]}, "messages[0].tool_call_id"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ):
        resp = post(**body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
