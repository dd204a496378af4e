"""Tool calls without a model: each format's parser on hand-written texts, the stream's hold-back against
the unstreamed parse, the grammars (a call they accept parses; what they refuse), the request's validation,
the Hermes fallback prompt on SmolLM2's template, and a tool template rendered as transformers renders it."""

import json
from pathlib import Path

import llguidance
import pytest

from jaxserve.api import tools
from jaxserve.api.chat import ChatServing, parse_chat_request
from jaxserve.api.protocol import APIError
from jaxserve.chat_template import render
from jaxserve.engine.grammar import ll_tokenizer
from jaxserve.engine.toolcalls import (
    FORMATS,
    CallStream,
    Parsed,
    Tool,
    ToolCall,
    closed,
    compile_tool_grammar,
    format_for,
)

HERMES, LLAMA, MISTRAL = FORMATS["hermes"], FORMATS["llama3_json"], FORMATS["mistral"]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = Tool("get_weather", "The weather in a city", json.dumps(CITY))
TIME = Tool("get_time", None, json.dumps({"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}}))


@pytest.mark.parametrize(
    "fmt, text, want",
    [
        (HERMES, "Paris is sunny.", Parsed("Paris is sunny.", ())),
        (
            HERMES,
            'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            Parsed("Let me look.\n", (ToolCall("get_weather", '{"city":"Paris"}'),)),
        ),
        (
            HERMES,
            '<tool_call>\n{"name":"a","arguments":{}}\n</tool_call>\n<tool_call>\n{"name":"b","arguments":'
            '"{\\"x\\": 1}"}\n</tool_call>',
            Parsed(None, (ToolCall("a", "{}"), ToolCall("b", '{"x":1}'))),
        ),
        (HERMES, '<tool_call>\n{"name": "a", "arguments": {</tool_call>', None),  # malformed: all content
        (HERMES, '<tool_call>\n{"arguments": {}}\n</tool_call>', None),  # no name
        (HERMES, '<tool_call>\n{"name": "a", "arguments": {}}', None),  # never closed
        (
            LLAMA,
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
            Parsed(None, (ToolCall("get_weather", '{"city":"Oslo"}'),)),
        ),
        (
            LLAMA,
            '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": [1]}}',
            Parsed(None, (ToolCall("a", "{}"), ToolCall("b", '{"y":[1]}'))),
        ),
        (LLAMA, "The answer is {not json}", None),
        (LLAMA, '{"name": "a", "parameters": {"x": ', None),
        (
            MISTRAL,
            'Sure.[TOOL_CALLS][{"name": "a", "arguments": {"q": "é"}}, {"name": "b", "arguments": {}}]',
            Parsed("Sure.", (ToolCall("a", '{"q":"é"}'), ToolCall("b", "{}"))),
        ),
        (MISTRAL, '[TOOL_CALLS][{"name": "a"', None),
    ],
)
def test_parsers_on_hand_written_texts(fmt, text, want):
    got = fmt.parse(text)
    assert got == (want or Parsed(text, ()))


@pytest.mark.parametrize(
    "fmt, text",
    [
        (HERMES, 'I will check.\n<tool_call>\n{"name": "a", "arguments": {"k": "<tool"}}\n</tool_call>\n'),
        (HERMES, "A plain answer with <tool and <tool_ca in it, never a call."),
        (HERMES, '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'),
        (HERMES, "  \n"),
        (LLAMA, '  {"name": "a", "parameters": {}}'),
        (LLAMA, "Not a call {}"),
        (MISTRAL, 'x [TOOL_C [TOOL_CALLS][{"name": "a", "arguments": {}}]'),
    ],
)
def test_a_stream_holds_back_markers_and_assembles_to_the_unstreamed_parse(fmt, text):
    want = fmt.parse(text)
    for step in (1, 3, 7):
        stream = CallStream(fmt)
        sent, calls = "", []
        for i in range(0, len(text), step):
            content, whole = stream.feed(text[i : i + step])
            sent += content
            calls += whole
            assert (want.content or "").startswith(sent)  # never a character that turns out to be a call's
        rest = stream.finish()
        assert sent + rest.content == (want.content or "") and tuple(calls) + rest.calls == want.calls


def test_a_stream_sends_each_call_when_it_is_whole():
    stream = CallStream(HERMES)
    first = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'
    assert stream.feed(first[:-1]) == ("", [])
    assert stream.feed(first[-1:] + "\n<tool_call>\n{") == ("", [ToolCall("a", "{}")])
    assert stream.feed('"name": "b", "arguments": {"k": 1}}\n</tool_call>') == ("", [ToolCall("b", '{"k":1}')])
    assert stream.finish() == Parsed("", ())


def test_a_call_cut_short_is_content():
    stream = CallStream(HERMES)
    whole = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'
    text = "Hm." + whole + '\n<tool_call>\n{"name": "b"'
    assert stream.feed(text) == ("Hm.", [ToolCall("a", "{}")])
    assert stream.finish() == Parsed('\n<tool_call>\n{"name": "b"', ())
    assert HERMES.parse(text) == Parsed('Hm.\n<tool_call>\n{"name": "b"', (ToolCall("a", "{}"),))


def test_the_format_follows_the_template():
    assert format_for("{{ '[TOOL_CALLS]' }}{{ tools }}", True) is MISTRAL
    assert format_for("<|python_tag|>{{ tools }}<|eom_id|>", True) is LLAMA
    assert format_for("<tool_call>{{ tools }}", True) is HERMES
    assert format_for("[TOOL_CALLS]", False) is HERMES  # a template without tools gets the Hermes fallback


# ---- grammars -----------------------------------------------------------------------------------------


def _walk(tok, grammar: str, text: str) -> tuple[bool, bool]:
    """(every token of `text` accepted, the grammar may end there)."""
    m = llguidance.LLMatcher(ll_tokenizer(tok), grammar, log_level=0)
    for t in tok.encode(text)[int(tok.add_bos) :]:
        if not m.consume_token(t):
            return False, False
    return True, m.is_accepting()


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from jaxserve.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_dir)


def test_required_grammars_accept_calls_and_refuse_the_rest(tok):
    g = compile_tool_grammar(HERMES, tok, (WEATHER, TIME), True, False)
    one = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name":"get_time","arguments":{"zone":"UTC"}}\n</tool_call>'
    assert _walk(tok, g, one) == (True, True) and _walk(tok, g, two) == (True, True)
    assert HERMES.parse(two).calls[1] == ToolCall("get_time", '{"zone":"UTC"}')
    assert not _walk(tok, g, "Sure")[0]
    assert not _walk(tok, g, '<tool_call>\n{"name":"get_time","arguments":{"zone":"PST"}}')[0]  # not in the enum
    assert not _walk(tok, g, '<tool_call>\n{"name":"get_weather","arguments":{}}')[0]  # city is required
    single = compile_tool_grammar(HERMES, tok, (WEATHER, TIME), False, False)
    assert not _walk(tok, single, two)[0]
    for fmt, text in (
        (LLAMA, '{"name":"get_weather","parameters":{"city":"Oslo"}}'),
        (MISTRAL, '[TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Oslo"}}]'),
    ):
        g = compile_tool_grammar(fmt, tok, (WEATHER,), False, False)
        assert _walk(tok, g, text) == (True, True) and fmt.parse(text).calls


def test_a_forced_call_cannot_run_on_with_properties_the_schema_does_not_list(tok):
    """An open object let SmolLM2 (Q4_1) write `"type":"string","required":"zone","required":…` after
    the zone of a named call until max_tokens: the grammar closes the objects that list their properties."""
    zone = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}}, "required": ["zone"]}
    g = compile_tool_grammar(HERMES, tok, (Tool("get_time", None, json.dumps(zone)),), False, False)
    call = '<tool_call>\n{"name":"get_time","arguments":{"zone":"UTC"'
    assert _walk(tok, g, call + "}}\n</tool_call>") == (True, True)
    assert not _walk(tok, g, call + ',"type":"string"')[0]
    assert not _walk(tok, g, call + ',"zone":"CET"')[0]


def test_closed_closes_listed_objects_and_leaves_the_rest_as_given():
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    shut = {**point, "additionalProperties": False}
    schema = {
        "type": "object",
        "properties": {"at": point, "path": {"type": "array", "items": point}, "either": {"anyOf": [point, {}]}},
        "$defs": {"p": point},
        "default": {"properties": {}},  # a value, not a schema
    }
    assert closed(schema) == {
        **schema,
        "properties": {"at": shut, "path": {"type": "array", "items": shut}, "either": {"anyOf": [shut, {}]}},
        "$defs": {"p": shut},
        "additionalProperties": False,
    }
    for as_given in (
        {"type": "object"},  # a free-form map
        {**point, "additionalProperties": True},
        {**point, "patternProperties": {"^y": {}}},
        {**point, "required": ["x", "y"]},  # y is one of the other properties
        {"type": "object", "properties": {"a": point}, "allOf": [point]},  # merged: closing one part refuses x
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/p", "properties": {"y": {}}}}, "$defs": {"p": point}},
    ):
        assert closed(as_given) == as_given


def test_the_lazy_grammar_is_free_until_a_call_starts(tok):
    g = compile_tool_grammar(HERMES, tok, (WEATHER,), False, True)
    assert _walk(tok, g, "Paris is sunny today, {no call} <tool") == (True, True)
    call = 'Let me see. <tool_call>\n{"name":"get_weather","arguments":{"city":"Rome"}}\n</tool_call>'
    assert _walk(tok, g, call) == (True, True)
    assert not _walk(tok, g, 'Let me see. <tool_call>\n{"name":"get_time"')[0]
    g = compile_tool_grammar(LLAMA, tok, (WEATHER,), False, True)
    assert _walk(tok, g, "Oslo is cold.") == (True, True)
    assert not _walk(tok, g, '{"name":"nope"')[0]


def test_a_schema_llguidance_refuses_is_a_400_naming_tools(tok):
    bad = Tool("x", None, json.dumps({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}))
    spec = tools.ToolSpec((bad,), "required", False, True)
    with pytest.raises(APIError) as e:
        tools.plan(spec, tok, None)
    assert e.value.status == 400 and e.value.param == "tools"


# ---- the request --------------------------------------------------------------------------------------

FN = {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": CITY}}
ASKED = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [FN, FN]}, "tools[1].function.name"),
        ({"tools": [FN], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"tools": [FN], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [FN], "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "a", "arguments": "{"}}]}
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "a", "arguments": "[1]"}}]}
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_tool_requests_name_the_field(extra, param):
    with pytest.raises(APIError) as e:
        parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra})
    assert e.value.status == 400 and e.value.param == param


def test_the_history_reaches_the_template_with_arguments_as_objects():
    req = parse_chat_request({"model": "m", "messages": ASKED, "tools": [FN], "tool_choice": "none"})
    assert req.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert req.messages[2] == {
        "role": "tool",
        "content": "18 C, sunny",
        "tool_call_id": "call_1",
        "name": "get_weather",
    }
    native = "{% for m in messages %}{{ m.tool_calls[0].function.arguments if m.tool_calls }}{% endfor %}{{ tools }}"
    messages, variables = tools.template_inputs(req.messages, tools.parse_spec([FN], "auto", None), native)
    assert messages is req.messages and variables["tools"] == [FN]


def test_the_hermes_fallback_on_smollm2s_template(tok):
    """SmolLM2's template takes no tools: they go into the system turn, an earlier call into the assistant's
    turn as a <tool_call> block, the result into a user turn as <tool_response>."""

    class Completions:
        tokenizer = tok

    req = parse_chat_request({"model": "m", "messages": ASKED, "tools": [FN]})
    text = tok.decode(ChatServing(Completions()).prompt_ids(req))
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert json.dumps(FN) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in text
    plain = parse_chat_request({"model": "m", "messages": ASKED[:1], "tools": [FN], "tool_choice": "none"})
    assert "# Tools" not in tok.decode(ChatServing(Completions()).prompt_ids(plain))


def test_answers_take_openais_shape(tok):
    spec = tools.parse_spec([FN], None, None)
    plan = tools.plan(spec, tok, None)
    call = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
    message, reason = tools.message(plan, call, "stop")
    assert reason == "tool_calls" and message["content"] is None
    (c,) = message["tool_calls"]
    assert (
        c["type"] == "function"
        and c["id"].startswith("call_")
        and c["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    )
    assert tools.message(plan, call[:30], "length") == (
        {"role": "assistant", "content": call[:30], "refusal": None},
        "length",
    )
    cut, reason = tools.message(plan, call + "\n" + call[:30], "length")  # the whole call stays a call
    assert reason == "length" and len(cut["tool_calls"]) == 1 and cut["content"] == "\n" + call[:30]
    named = tools.plan(
        tools.parse_spec([FN], {"type": "function", "function": {"name": "get_weather"}}, None), tok, None
    )
    assert tools.message(named, call, "stop")[1] == "stop"  # as OpenAI: a named function's call ends with stop
    stream = tools.ChoiceStream(plan)
    assert stream.feed("One moment. " + call[:5]) == [{"content": "One moment."}]
    (head,), (args,) = (d["tool_calls"] for d in stream.feed(call[5:]))
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert args == {"index": 0, "function": {"arguments": '{"city":"Paris"}'}}
    assert stream.finish("stop") == ([{"content": " "}], "tool_calls")


# Templates written here that render an assistant's calls the way Qwen 2.5's (Hermes), Llama 3.1's (JSON, as
# vLLM's tool_chat_template_llama3.1_json has it) and Mistral's templates do: their call syntax only, not
# copies of those templates (third-party code stays out of the repository).
QWEN_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}"
    '{{ "\n" if m.content or not loop.first }}<tool_call>\n{"name": "{{ c.function.name }}", "arguments": '
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}{{ tools | length }}"
)
LLAMA_LIKE = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content or '' }}"
    '{% for c in m.tool_calls or [] %}{"name": "{{ c.function.name }}", "parameters": '
    "{{ c.function.arguments | tojson }}}{% endfor %}"
    "{{ '<|eom_id|>' if builtin_tools is defined else '<|eot_id|>' }}{% endfor %}{{ tools | length }}"
)
MISTRAL_LIKE = (
    "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }}[/INST]"
    "{% elif m.tool_calls %}[TOOL_CALLS] [{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}'
    "{{ ', ' if not loop.last }}{% endfor %}]</s>{% endif %}{% endfor %}{{ tools | length }}"
)


@pytest.mark.parametrize(
    "template, parser, turn",
    [
        (None, "hermes", "<|im_start|>assistant\n"),  # SmolLM2's own template: the Hermes fallback
        (QWEN_LIKE, "hermes", "<|im_start|>assistant\n"),
        (LLAMA_LIKE, "llama3_json", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        (MISTRAL_LIKE, "mistral", "[/INST]"),
    ],
)
def test_calls_in_the_history_parse_back_from_the_template_s_render(tok, template, parser, turn):
    """An assistant turn with calls, rendered by a template that teaches a format, is read back by the
    parser chosen for that template as the same calls (arguments as compact JSON text)."""
    calls = [
        {
            "id": "a1b2c3d4e",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Zürich <&>"}'},
        },
        {"id": "f5g6h7i8j", "type": "function", "function": {"name": "plan", "arguments": '{"days": [1, 2]}'}},
    ]
    if parser == "llama3_json":
        calls = calls[:1]  # Llama 3.1's templates take one call a turn
    body = {"model": "m", "messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "tool_calls": calls}]}
    req = parse_chat_request({**body, "tools": [FN]})
    source = template or tok.chat_template
    messages, variables = tools.template_inputs(req.messages, req._tool_spec, source)
    fake = _Tok()
    fake.chat_template = source
    text = render(fake, messages, add_generation_prompt=False, **variables)
    fmt = format_for(source, tools.takes_tools(source))
    assert fmt is FORMATS[parser]
    assert fmt.parse(text[text.rindex(turn) + len(turn) :]).calls == tuple(
        ToolCall(
            c["function"]["name"],
            json.dumps(json.loads(c["function"]["arguments"]), separators=(",", ":"), ensure_ascii=False),
        )
        for c in calls
    )


def test_renders_equal_transformers_on_a_tool_template():
    """tests/chat_templates/tools.jinja uses what the Qwen 2.5 and Llama 3.1 tool templates use; the expected
    renders were produced by transformers' own renderer (scripts/chat_template_renders.py)."""
    folder = Path(__file__).parent / "chat_templates"
    tok = _Tok()
    tok.chat_template = (folder / "tools.jinja").read_text()
    cases = json.loads((folder / "tools_renders.json").read_text())["cases"]
    assert len(cases) == 4
    for case in cases:
        req = parse_chat_request({"model": "m", **case["request"]})
        messages, variables = tools.template_inputs(req.messages, req._tool_spec, tok.chat_template)
        assert render(tok, messages, add_generation_prompt=True, **variables) == case["render"]


class _Tok:
    bos_id, eos_id = 0, 1
    chat_template: str | None = None

    def token_bytes(self, i):
        return [b"<s>", b"</s>"][i]
