"""Chat Completions: the model's own template, the request's validation, and the endpoint through the
official `openai` client (plain, streamed, n, logprobs, `parse` with a pydantic model, structured outputs)
against a real SmolLM2 server on 127.0.0.1."""

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
from server import Server

from jaxserve.api.chat import ChatServing, parse_chat_request
from jaxserve.api.protocol import APIError
from jaxserve.chat_template import TemplateError, end_of_turn_ids, render

SMOL = "smollm2-135m-instruct"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


# ---- the template -------------------------------------------------------------------------------------


def test_smollm2_template_renders_its_own_format(smollm2):
    """The GGUF's template, read again from the source for a checkpoint converted before templates were
    stored: its default system turn, each turn in <|im_start|>role ... <|im_end|>, the generation prompt."""
    tok = smollm2.tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert render(tok, [{"role": "user", "content": "Hi"}]) == (
        SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(
        tok,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],
        add_generation_prompt=False,
    ) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert end_of_turn_ids(tok) == (2,)


class _Tok:
    bos_id, eos_id = 1, 2
    chat_template: str | None = None

    def token_bytes(self, i):
        return {1: b"<s>", 2: b"</s>"}[i]


def test_the_sandbox_and_the_helpers():
    tok = _Tok()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"
    assert render(tok, [{"role": "user", "content": "é\n"}]) == '<s>"é\\n"</s>'
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(TemplateError, match="only user turns"):
        render(tok, [{"role": "user", "content": "x"}])
    tok.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        render(tok, [{"role": "user", "content": "x"}])
    tok.chat_template = "{% set _ = messages.append(1) %}"  # immutable: the caller's list cannot change
    with pytest.raises(TemplateError):
        render(tok, [{"role": "user", "content": "x"}])


def test_a_model_without_a_template_is_a_clear_400():
    class Completions:
        tokenizer = _Tok()

    req = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(APIError) as e:
        ChatServing(Completions()).prompt_ids(req)
    assert e.value.status == 400 and e.value.param == "messages" and "no chat template" in e.value.message


# ---- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),  # answers no call
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]},
            "messages[0].content[1].type",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
    ],
)
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(APIError) as e:
        parse_chat_request({"model": "m", **body})
    assert e.value.status == 400 and e.value.param == param


def test_text_parts_and_developer_messages():
    req = parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "rules"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,
        }
    )
    assert req.messages == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]
    assert req.limit == 7


# ---- the endpoint ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_server(smollm2_dir):
    server = Server(
        "--model", SMOL, "--max-slots", "16", "--max-context", "1024", checkpoints=smollm2_dir.parent
    ).wait_ready()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="x", max_retries=0)


HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_chat_completion_and_its_equal_completion(client):
    """temperature 0: the chat's tokens are a completion's of the rendered template; it ends at <|im_end|>."""
    r = client.chat.completions.create(model=SMOL, messages=HELLO, max_tokens=40, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == SMOL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason == "stop" and "<|im_end|>" not in choice.message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    prompt = SMOL_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    c = client.completions.create(model=SMOL, prompt=prompt, max_tokens=40, temperature=0)
    assert c.choices[0].text == choice.message.content
    assert c.usage.prompt_tokens == r.usage.prompt_tokens


@pytest.mark.slow
def test_n_logprobs_and_seed(client):
    r = client.chat.completions.create(
        model=SMOL, messages=HELLO, max_completion_tokens=6, n=3, seed=5, logprobs=True, top_logprobs=20
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        content = c.logprobs.content
        assert len(content) >= 1 and all(len(t.top_logprobs) == 20 for t in content)
        assert "".join(t.token for t in content) == c.message.content
        assert all(bytes(t.bytes).decode() == t.token for t in content)
        assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    again = client.chat.completions.create(model=SMOL, messages=HELLO, max_completion_tokens=6, n=3, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


@pytest.mark.slow
def test_stream_role_first_then_content_finish_and_usage(client, smol_server):
    want = client.chat.completions.create(model=SMOL, messages=HELLO, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=SMOL,
            messages=HELLO,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [want.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    raw = httpx.post(
        smol_server.url + "/v1/chat/completions",
        json={"model": SMOL, "messages": HELLO, "max_tokens": 3, "stream": True},
        timeout=120,
    ).text
    assert raw.endswith("data: [DONE]\n\n")


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    population: int = pydantic.Field(ge=0, le=100_000_000)
    coastal: bool


@pytest.mark.slow
def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=SMOL,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        max_tokens=200,
        temperature=1.0,
        seed=3,
    )
    city = r.choices[0].message.parsed
    assert isinstance(city, City), r.choices[0].message.content


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "reasons": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
    },
    "required": ["answer", "score"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_structured_stream_with_n_validates(client):
    chunks = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}},
        max_tokens=150,
        temperature=1.0,
        n=2,
        stream=True,
    )
    texts, reasons = {0: "", 1: ""}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert reasons == {0: "stop", 1: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.slow
def test_response_format_on_completions_and_a_refused_schema(client, smol_server):
    """The extension: /v1/completions takes the same response_format."""
    r = client.completions.create(
        model=SMOL,
        prompt="A JSON object describing a dog:",
        max_tokens=120,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}}},
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}
    for path, body in (
        ("/v1/chat/completions", {"messages": HELLO}),
        ("/v1/completions", {"prompt": "x"}),
    ):
        resp = httpx.post(smol_server.url + path, json={"model": SMOL, **body, "response_format": bad}, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format"
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
    resp = httpx.post(smol_server.url + "/v1/chat/completions", json={"model": SMOL, "messages": [image]}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages[0].content[0].type"
    with pytest.raises(openai.BadRequestError) as e:  # a tool result answering no call (tests/test_tools_api.py)
        client.chat.completions.create(model=SMOL, messages=[{"role": "tool", "tool_call_id": "c", "content": "x"}])
    assert e.value.body["param"] == "messages[0].tool_call_id"


def test_templates_are_read_from_hf_directories_and_stored_with_the_tokenizer(tmp_path, smollm2):
    from jaxserve.checkpoint.hf_import import read_chat_template
    from jaxserve.tokenizer import load_tokenizer

    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # the file wins, as in transformers
    assert read_chat_template(tmp_path) == "J"
    assert read_chat_template(tmp_path / "missing") is None

    tok = smollm2.tokenizer
    saved = tmp_path / "saved"
    saved.mkdir()
    tok.save(saved)
    assert load_tokenizer(saved).chat_template == tok.chat_template
