"""The HTTP API through the official `openai` client and raw httpx, against a real server on 127.0.0.1."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from server import Server

KEY = "test-key"
TINY = "tiny-llama"
SHEPHERD = "; I shall not want."


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    server = Server(
        "--model",
        TINY,
        "--max-slots",
        "64",
        "--max-context",
        "256",
        "--served-model-name",
        "tiny",
        checkpoints=tiny_dir.parent,
        api_key=KEY,
    ).wait_ready()
    yield server
    assert server.stop() == 0  # Ctrl-C shuts down cleanly


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)


def post(server, body, path="/v1/completions", **kw):
    headers = {**server.headers, "Content-Type": "application/json"}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kw)


def sse_events(text: str) -> list[str]:
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


# ---- the openai client -------------------------------------------------------------------------------


def test_completion(client):
    r = client.completions.create(model=TINY, prompt="The Lord is my shepherd", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == TINY
    assert r.choices[0].text.startswith(SHEPHERD)
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.system_fingerprint


def test_alias_and_stream_equal_non_stream(client):
    want = (
        client.completions.create(model="tiny", prompt="It was the best of times", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    chunks = list(
        client.completions.create(
            model="tiny", prompt="It was the best of times", max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n_and_several_prompts(client):
    r = client.completions.create(
        model=TINY, prompt=["Call me Ishmael.", "Tyger Tyger"], n=2, max_tokens=4, temperature=0.8, seed=3
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    by_index = {c.index: c.text for c in r.choices}
    again = client.completions.create(
        model=TINY, prompt=["Call me Ishmael.", "Tyger Tyger"], n=2, max_tokens=4, temperature=0.8, seed=3
    )
    assert {c.index: c.text for c in again.choices} == by_index  # seeded: reproducible


def test_echo_logprobs_for_scoring(client, tiny):
    prompt = tiny.tokenizer.encode("Four score and seven years ago")
    r = client.completions.create(model=TINY, prompt=prompt, max_tokens=0, echo=True, logprobs=3, temperature=0)
    choice = r.choices[0]
    assert choice.text == "Four score and seven years ago"
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) in (3, 4) for t in lp.top_logprobs[1:])  # the top 3, and the prompt's token if not among them
    assert all(token in top for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert r.usage.completion_tokens == 0


def test_stop_and_logit_bias(client, tiny):
    r = client.completions.create(
        model=TINY, prompt="The Lord is my shepherd", max_tokens=12, temperature=0, stop=[" want"]
    )
    assert r.choices[0].text == "; I shall not" and r.choices[0].finish_reason == "stop"
    semicolon = tiny.tokenizer.encode(";")[0]
    r = client.completions.create(
        model=TINY, prompt="The Lord is my shepherd", max_tokens=2, temperature=0, logit_bias={str(semicolon): -100}
    )
    assert not r.choices[0].text.startswith(";")


# ---- wire details --------------------------------------------------------------------------------------


def test_sse_framing_and_usage_chunk(tiny_server):
    r = post(
        tiny_server,
        {
            "model": TINY,
            "prompt": "Alice was",
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": 1,
        },
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)
    offsets = [
        o for c in chunks[:-1] if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]
    ]
    assert offsets == sorted(offsets) and offsets[0] == len("Alice was")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"logprobs": 6}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [5, 99999]}, "prompt"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"suffix": "end"}, "suffix"),
        ({"temperature": "hot"}, "temperature"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": ["ok", "\udc00"]}, "prompt"),
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"prompt": [1, "2"]}, "prompt"),
        ({"echo": "yes"}, "echo"),
    ],
)
def test_invalid_parameters_name_the_param(tiny_server, body, param):
    # json.dumps escapes a lone surrogate as \\ud800, as a client's JSON would
    r = post(tiny_server, None, content=json.dumps({"model": TINY, "prompt": "hi", **body}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}


def test_missing_parameter(tiny_server):
    r = post(tiny_server, {"model": TINY})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_context_length(tiny_server):
    r = post(tiny_server, {"model": TINY, "prompt": "hi " * 10, "max_tokens": 300})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_model_bad_json_big_body_and_unknown_params(tiny_server):
    r = post(tiny_server, {"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(tiny_server.url + "/v1/completions", content=b"{nope", headers=tiny_server.headers)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post(tiny_server, {"model": TINY, "prompt": "x" * (5 * 1024 * 1024)})
    assert r.status_code == 413
    r = post(tiny_server, {"model": TINY, "prompt": "hi", "max_tokens": 1, "frobnicate": True})
    assert r.status_code == 200


def test_api_key(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/completions", json={"model": TINY, "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(tiny_server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=TINY, prompt="hi"
        )


def test_models_health_metrics_tokenizer_routes(tiny_server, client, tiny):
    assert [m.id for m in client.models.list()] == [TINY, "tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(tiny_server.url + "/v1/models/nope", headers=tiny_server.headers).status_code == 404
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    metrics = httpx.get(tiny_server.url + "/metrics").text
    for name in (
        "jaxserve_requests_total",
        "jaxserve_generation_tokens_total",
        "jaxserve_queue_depth",
        "jaxserve_active_slots",
        "jaxserve_time_to_first_token_seconds_bucket",
        "jaxserve_compiles_total",
        "jaxserve_time_per_output_token_seconds_count",
        'jaxserve_matmul_formulation_info{bf16_from_rows="",formulation="float32",kernel_below_rows=""} 1.0',
    ):
        assert name in metrics
    r = post(tiny_server, {"prompt": "Call me Ishmael.", "add_special_tokens": False}, path="/tokenize")
    assert r.json()["tokens"] == tiny.tokenizer.encode("Call me Ishmael.")
    r = post(tiny_server, {"tokens": r.json()["tokens"]}, path="/detokenize")
    assert r.json()["prompt"] == "Call me Ishmael."
    info = httpx.get(tiny_server.url + "/tokenizer_info", headers=tiny_server.headers).json()
    assert info["eos_token"] == "" or "eos_token" in info
    spec = httpx.get(tiny_server.url + "/openapi.json").json()
    assert "/v1/completions" in spec["paths"]
    assert "temperature" in spec["components"]["schemas"]["CompletionRequest"]["properties"]


def test_sixty_four_concurrent_streams(tiny_server):
    async def one(http, i):
        text, finish = "", None
        async with http.stream(
            "POST",
            "/v1/completions",
            json={
                "model": TINY,
                "prompt": "The Lord is my shepherd",
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
            },
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    text += chunk["choices"][0]["text"]
                    finish = chunk["choices"][0]["finish_reason"] or finish
        return text, finish

    async def main():
        async with httpx.AsyncClient(base_url=tiny_server.url, headers=tiny_server.headers, timeout=300) as http:
            return await asyncio.gather(*(one(http, i) for i in range(64)))

    results = asyncio.run(main())
    assert all(text.startswith(SHEPHERD) and finish == "length" for text, finish in results)


def test_client_disconnect_frees_the_slot(tiny_server):
    def active():
        line = [
            x
            for x in httpx.get(tiny_server.url + "/metrics").text.splitlines()
            if x.startswith("jaxserve_active_slots ")
        ][0]
        return float(line.split()[1])

    with httpx.stream(
        "POST",
        tiny_server.url + "/v1/completions",
        headers=tiny_server.headers,
        timeout=60,
        json={"model": TINY, "prompt": "It was", "max_tokens": 200, "stream": True, "temperature": 0},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk read, then the client goes away
    deadline = time.time() + 30
    while active() > 0 and time.time() < deadline:
        time.sleep(0.2)
    assert active() == 0
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    r = post(tiny_server, {"model": TINY, "prompt": "The Lord is my shepherd", "max_tokens": 4, "temperature": 0})
    assert r.json()["choices"][0]["text"].startswith("; I")


def test_busy_server_answers_429_with_retry_after(tiny_dir):
    server = Server(
        "--model", TINY, "--max-slots", "1", "--max-context", "256", "--max-waiting", "1", checkpoints=tiny_dir.parent
    ).wait_ready()
    try:

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
                return await asyncio.gather(
                    *(
                        http.post(
                            "/v1/completions",
                            json={"model": TINY, "prompt": "It was", "max_tokens": 100, "temperature": 0},
                        )
                        for _ in range(8)
                    )
                )

        responses = asyncio.run(main())
        busy = [r for r in responses if r.status_code == 429]
        assert busy and all(r.headers.get("retry-after") for r in busy)
        assert busy[0].json()["error"]["type"] == "server_busy_error"
        assert any(r.status_code == 200 for r in responses)
    finally:
        assert server.stop() == 0


def test_the_sampled_token_is_always_in_top_logprobs(tiny_server, client):
    """OpenAI: "always the logprob of the sampled token, so there may be up to logprobs+1 elements"; at
    temperature 2 most sampled tokens are not the argmax."""

    def check(lp, k):
        for token, top in zip(lp.tokens, lp.top_logprobs):
            if top is not None:
                assert token in top and len(top) in (k, k + 1)

    base = dict(model=TINY, prompt="It was the best of times", max_tokens=12, temperature=2.0, logprobs=1, seed=5)
    for kw in ({}, {"echo": True}, {"n": 3}, {"n": 2, "best_of": 3}, {"logprobs": 0}):
        r = client.completions.create(**{**base, **kw})
        for choice in r.choices:
            check(choice.logprobs, kw.get("logprobs", 1))
    texts: dict[int, list] = {}
    for chunk in client.completions.create(**base, stream=True, n=2):
        for choice in chunk.choices:
            if choice.logprobs:
                check(choice.logprobs, 1)
                texts.setdefault(choice.index, []).append(choice.text)
    assert set(texts) == {0, 1}


def serving_over(texts: dict[int, bytes]):
    """A CompletionServing (nothing else set up) whose tokenizer maps token ids to `texts`."""
    from jaxserve.api.serving import CompletionServing

    class Tok:
        def token_bytes(self, t):
            return texts[t]

    serving = CompletionServing.__new__(CompletionServing)
    serving.tokenizer = Tok()
    return serving


def test_top_logprobs_add_the_sampled_token():
    from jaxserve.engine.types import TokenInfo

    serving = serving_over({1: b"a", 2: b"b", 3: b"a"})
    out = serving._logprobs([TokenInfo(3, -2.0, [(1, -0.5), (2, -1.0)])], 1, 0)
    # token 3 was sampled: it is in, under its own text; token 1 has the same text, so it is told apart
    assert out["tokens"] == ["a"] and out["top_logprobs"][0] == {"a [token 1]": -0.5, "a": -2.0}
    out = serving._logprobs([TokenInfo(2, -1.0, [(1, -0.5), (2, -1.0)])], 0, 0)
    assert out["top_logprobs"][0] == {"b": -1.0}  # logprobs 0: the sampled token alone


def test_top_logprobs_keep_tokens_with_the_same_text():
    from jaxserve.engine.types import TokenInfo

    serving = serving_over({1: b"a", 2: b"a", 3: b"\xe2"})
    out = serving._logprobs([TokenInfo(1, -0.5, [(1, -0.5), (2, -1.0), (3, float("-inf"))])], 3, 0)
    assert len(out["top_logprobs"][0]) == 3
    assert out["top_logprobs"][0]["bytes:\\xe2"] == -9999.0  # -inf never reaches JSON


@pytest.fixture(scope="module")
def smol_server(smollm2_dir):
    # float32 weights: the reference comparisons below are exact to 2e-3 (the card's default is the GGUF's blocks)
    server = Server(
        "--max-slots", "8", "--max-context", "512", "--quantize", "none", checkpoints=smollm2_dir.parent
    ).wait_ready()
    yield server
    assert server.stop() == 0


def test_readme_example_says_paris(smol_server):
    client = openai.OpenAI(base_url=smol_server.url + "/v1", api_key="x", max_retries=0)
    r = client.completions.create(
        model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.choices[0].text.startswith(" Paris.")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
    )
    assert streamed == r.choices[0].text


def test_scoring_as_lm_eval_does_matches_reference(smol_server, reference):
    """lm-evaluation-harness's local-completions: token-id prompts, echo, max_tokens 0, logprobs 1."""
    prompts = [p["prompt_ids"] + p["greedy_ids"][:8] for p in reference["prompts"]]
    r = httpx.post(
        smol_server.url + "/v1/completions",
        timeout=300,
        json={
            "model": "smollm2-135m-instruct",
            "prompt": prompts,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
            "seed": 1234,
        },
    )
    assert r.status_code == 200
    for choice, p in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), reference["prompts"]):
        lp = choice["logprobs"]
        n = len(p["prompt_ids"])
        assert lp["token_logprobs"][0] is None
        for got, want in zip(lp["token_logprobs"][1:n], p["prompt_logprobs_echo"][1:]):
            assert abs(got - want) < 2e-3
        for got, want in zip(lp["token_logprobs"][n:], p["greedy_logprobs"][:8]):
            assert abs(got - want) < 2e-3
        # greedy continuation: each token is the top-1 entry (how lm-eval computes is_greedy)
        for token, top in zip(lp["tokens"][n:], lp["top_logprobs"][n:]):
            assert max(top, key=top.get) == token
    info = httpx.get(smol_server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>"


def test_failure_after_streaming_started_is_an_error_event():
    from jaxserve.api.app import _sse

    async def chunks():
        yield {"choices": [{"text": "b"}]}
        raise RuntimeError("the engine failed")

    async def collect():
        return [event async for event in _sse({"choices": [{"text": "a"}]}, chunks())]

    events = asyncio.run(collect())
    assert events[0].startswith('data: {"choices"') and events[1].startswith('data: {"choices"')
    assert json.loads(events[2][6:])["error"]["message"] == "the engine failed"
    assert events[3] == "data: [DONE]\n\n"
