"""Hostile and unlucky clients over real HTTP, against the app served by uvicorn with `jaxserve serve`'s own
settings (flags parsed by the CLI) over the scheduler and a fake core: no jax, so each server starts at once.

Every loop here is bounded in count and time; sockets bind 127.0.0.1 only.
"""

import contextlib
import json
import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fake_core import FakeCore
from server import free_port

from jaxserve.api.metrics import Metrics
from jaxserve.api.serving import CompletionServing
from jaxserve.cli import build_parser, server_state, uvicorn_config
from jaxserve.engine.scheduler import Scheduler

MODEL = "fake"


class ByteTokenizer:
    """Text is its UTF-8 bytes (token b); a generated token t reads '<t>'."""

    vocab_size, eos_id, bos_id, add_bos = 1000, 50, None, False
    fim_prefix_id = fim_suffix_id = fim_middle_id = None

    def encode(self, text):
        return list(text.encode("utf-8"))  # a lone surrogate raises here, as in a real tokenizer

    def decode(self, ids):
        return "".join(f"<{t}>" for t in ids)

    def token_bytes(self, t):
        return f"<{t}>".encode()

    def token_id(self, name):
        return None  # no special tokens by name: no fill-in-the-middle


class SlowCore(FakeCore):
    def forward(self, table, max_position, max_slot):
        time.sleep(0.02)
        return super().forward(table, max_position, max_slot)


class BrokenCore(FakeCore):
    def forward(self, table, max_position, max_slot):
        raise RuntimeError("device lost")


@contextlib.contextmanager
def serve(core, *flags):
    args = build_parser().parse_args(["serve", "--port", str(free_port()), *flags])
    from jaxserve.api.app import create_app

    state = server_state(args, Metrics())
    scheduler = Scheduler(core, ByteTokenizer(), max_waiting=args.max_waiting).start()
    state.serving = CompletionServing(scheduler, ByteTokenizer(), [MODEL], state.metrics, "fp")
    server = uvicorn.Server(uvicorn_config(create_app(state), args))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield url, args.port, scheduler
    finally:
        server.should_exit = True
        thread.join(10)
        scheduler.shutdown()


@pytest.fixture(scope="module")
def fake():
    with serve(FakeCore(slots=4, cache_len=256), "--max-body-bytes", "100000", "--header-timeout", "1") as s:
        yield s


def post(url, body, path="/v1/completions", **kw):
    """JSON with ASCII escapes (json.dumps' default), so a lone surrogate travels as the escape \\ud800."""
    headers = {"Content-Type": "application/json"}
    return httpx.post(url + path, content=json.dumps(body), headers=headers, **{"timeout": 30, **kw})


def status_count(url, status: int) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'jaxserve_requests_total{{status="{status}"}}'):
            return float(line.split()[1])
    return 0


def raw_request(port, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes on a fresh connection, then read until the server closes it (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                out += chunk
        return out


# ---- inputs that were 500s: now 400 naming the parameter -----------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": ["ok", "a\udfffb"]}, "prompt"),
        ({"suffix": "\ud800"}, "suffix"),
        ({"stop": ["\ud800"]}, "stop"),
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"logit_bias": {"³³": 1}}, "logit_bias"),
        ({"logit_bias": {"--5": 1}}, "logit_bias"),
        ({"logit_bias": {"1" * 5000: 1}}, "logit_bias"),
        ({"prompt": [1, "2"]}, "prompt"),
        ({"prompt": [[1, 2], [3, "4"]]}, "prompt"),
        ({"echo": "yes"}, "echo"),
        ({"stream": 1}, "stream"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"n": 2.0}, "n"),
        ({"stream_options": {"include_usage": "true"}, "stream": True}, "stream_options"),
        ({"prompt": [[[[[1]]]]]}, "prompt"),
    ],
)
def test_bad_values_are_400_naming_the_param(fake, body, param):
    url, *_ = fake
    r = post(url, {"model": MODEL, "prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),  # was a 500 (TypeError)
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfffb"}]}]}, "messages[0].content"),
        ({"stop": ["\ud800"]}, "stop"),
        ({"user": "\udfff"}, "user"),
        ({"temperature": "0.5"}, "temperature"),  # were accepted as numbers
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_completion_tokens": "5"}, "max_completion_tokens"),
        ({"top_logprobs": "2", "logprobs": True}, "top_logprobs"),
        ({"n": 2.0}, "n"),
        ({"seed": "7"}, "seed"),
        ({"logprobs": "true"}, "logprobs"),
        ({"stream": 1}, "stream"),
    ],
)
def test_chat_is_as_strict_as_completions(fake, body, param):
    url, *_ = fake
    r = post(url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}, "/v1/chat/completions")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_metrics_and_probes_read_the_schedulers_stats(fake):
    url, _, scheduler = fake
    assert post(url, {"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200
    stats = scheduler.stats()
    assert stats.healthy and stats.steps > 0 and stats.queue_depth == 0
    metrics = httpx.get(url + "/metrics").text
    assert f"jaxserve_kv_pages {float(stats.kv_pages)}" in metrics
    # the fake core compiles nothing and has no model: those series are left out, not made up
    assert stats.compiles is None and stats.formulation is None
    assert "jaxserve_compiles" not in metrics and "jaxserve_matmul_formulation" not in metrics
    assert httpx.get(url + "/ready").json() == {"status": "ready"}


def test_an_int_is_still_a_float():
    from jaxserve.api.protocol import parse_completion_request

    req = parse_completion_request({"model": MODEL, "prompt": [1, 2], "temperature": 1, "top_p": 1})
    assert (req.temperature, req.prompt) == (1.0, [1, 2])


def test_lone_surrogates_in_raw_bytes_and_tokenize(fake):
    url, *_ = fake
    raw = b'{"model": "fake", "prompt": "a\xed\xa0\x80b", "max_tokens": 2}'
    r = httpx.post(url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(url, {"prompt": "\ud800"}, path="/tokenize")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_deeply_nested_json_is_400(fake):
    url, *_ = fake
    for depth in (10_000, 900):  # past the JSON decoder's recursion limit; within it, but past repr's
        body = b'{"model": "fake", "max_tokens": 1, "prompt": ' + b"[" * depth + b"]" * depth + b"}"
        r = httpx.post(url + "/v1/completions", content=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] in (None, "prompt")


def test_more_prompts_than_can_ever_wait_is_400_not_429(fake):
    url, *_ = fake
    r = post(url, {"model": MODEL, "prompt": ["Hi"] * 257, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_wrong_method_and_unknown_path_in_the_envelope(fake):
    url, *_ = fake
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "POST" in r.headers["allow"]
    for path in ("/v1/models/%0A", "/nope"):
        r = httpx.get(url + path)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", path
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_client_hanging_up_mid_upload_is_not_a_server_error(fake, caplog):
    url, port, _ = fake
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head + b'{"model": "fake", "prompt": "' + b"x" * 30)
        deadline = time.time() + 5
        while status_count(url, 499) < 1 and time.time() < deadline:
            time.sleep(0.05)
    assert status_count(url, 499) >= 1 and status_count(url, 500) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_oversized_body_gets_a_413_the_client_can_read(fake):
    _, port, _ = fake  # --max-body-bytes 100000
    body = b"x" * (4 * 1024 * 1024)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    answer = raw_request(port, head + body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"].startswith("the request body exceeds")


def test_an_oversized_body_sent_slowly_still_gets_its_413(fake):
    # 60 chunks of 16 KiB, one every 0.1 s: the upload outlasts the keep-alive timeout (5 s); a server that
    # answered at once and then closed the idle-looking connection reset this client before it could read
    _, port, _ = fake
    chunk, count = b"x" * 16384, 60
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(chunk) * count}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for _ in range(count):
            sock.sendall(chunk)
            time.sleep(0.1)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]


# ---- slow clients ------------------------------------------------------------------------------------------


def test_slow_headers_and_silent_sockets_are_closed(fake):
    _, port, _ = fake  # --header-timeout 1
    start = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        closed = False
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        for i in range(20):  # a header line every 0.25 s: 5 s if never cut
            try:
                sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
                sock.settimeout(0.25)
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    assert closed and time.time() - start < 4
    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        assert silent.recv(1024) == b""  # closed after the header timeout, not after our 5 s


def test_a_slow_body_gets_408():
    with serve(FakeCore(), "--body-timeout", "0.5") as (_, port, _):
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        answer = raw_request(port, head + b'{"model":', timeout=5)
        assert answer.startswith(b"HTTP/1.1 408")


def test_connections_beyond_the_limit_get_503():
    with serve(FakeCore(), "--max-connections", "3", "--header-timeout", "30") as (url, port, _):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert httpx.get(url + "/health").status_code == 503
        finally:
            for sock in idle:
                sock.close()
        deadline = time.time() + 5
        while httpx.get(url + "/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(url + "/health").status_code == 200


# ---- engine failure and deadlines -------------------------------------------------------------------------


def test_after_an_engine_failure_new_requests_get_503_at_once():
    with serve(BrokenCore()) as (url, *_):
        first = post(url, {"model": MODEL, "prompt": "hi", "max_tokens": 4})
        assert first.status_code == 500
        start = time.time()
        r = post(url, {"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "device lost" in r.json()["error"]["message"] and time.time() - start < 5
        s = httpx.post(
            url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": 4}, timeout=10
        )
        assert s.status_code == 503
        assert httpx.get(url + "/health").status_code == 503
        assert httpx.get(url + "/live").status_code == 503  # restarting the process would help
        assert httpx.get(url + "/ready").json() == {"status": "error"}


# ---- liveness and readiness --------------------------------------------------------------------------------


def test_live_and_ready_while_serving(fake):
    url, *_ = fake
    assert httpx.get(url + "/live").json() == {"status": "ok"}
    r = httpx.get(url + "/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_loading_is_live_not_ready_and_draining_is_not_ready():
    import signal

    from starlette.testclient import TestClient

    from jaxserve.api.app import ServerState, create_app
    from jaxserve.cli import _graceful_server_class

    state = ServerState(metrics=Metrics())
    with TestClient(create_app(state)) as client:
        assert client.get("/live").status_code == 200
        assert [client.get(p).status_code for p in ("/ready", "/health")] == [503, 503]
        assert client.get("/ready").json() == {"status": "loading"}
        state.serving = CompletionServing(
            Scheduler(FakeCore(), ByteTokenizer()).start(), ByteTokenizer(), [MODEL], state.metrics, "fp"
        )
        try:
            assert client.get("/ready").status_code == 200
            server = _graceful_server_class(state)(uvicorn.Config(create_app(state)))
            server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does: in-flight requests may still finish
            assert server.should_exit and state.draining
            r = client.get("/ready")
            assert r.status_code == 503 and r.json() == {"status": "draining"}
            assert client.get("/live").status_code == 200 and client.get("/health").status_code == 200
        finally:
            state.serving.scheduler.shutdown()


def test_request_timeout_running_queued_and_streaming():
    # slots 4, a step takes 20 ms: 200 tokens take 4 s, past the 0.5 s deadline
    with serve(SlowCore(slots=4, cache_len=256), "--request-timeout", "0.5") as (url, _, scheduler):
        long = {"model": MODEL, "prompt": [1], "max_tokens": 200, "ignore_eos": True}
        with httpx.Client(base_url=url, timeout=30) as http:
            hog = threading.Thread(target=http.post, args=("/v1/completions",), kwargs={"json": {**long, "n": 4}})
            hog.start()
            time.sleep(0.1)  # the hog holds every slot until its deadline; this one's own is sooner
            queued = http.post(
                "/v1/completions", json={**long, "max_tokens": 1}, headers={"X-Stainless-Read-Timeout": "0.2"}
            )
            hog.join(10)
            assert queued.status_code == 503 and queued.headers["retry-after"]
            assert queued.json()["error"]["code"] == "request_timeout"
            running = http.post("/v1/completions", json=long)
            assert running.status_code == 504 and "generated tokens" in running.json()["error"]["message"]
            stream = http.post("/v1/completions", json={**long, "stream": True})
            events = [e[6:] for e in stream.text.split("\n\n") if e]
            assert stream.status_code == 200 and events[-1] == "[DONE]"
            assert json.loads(events[0])["choices"] and json.loads(events[-2])["error"]["code"] == "request_timeout"
            time.sleep(0.1)
            assert scheduler.active_slots == 0
            r = http.post("/v1/completions", json={**long, "max_tokens": 3})
            assert r.status_code == 200  # the slots were freed


def test_the_clients_own_timeout_bounds_a_request():
    with serve(SlowCore(slots=4, cache_len=256)) as (url, *_):
        r = httpx.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": [1], "max_tokens": 200, "ignore_eos": True},
            headers={"X-Stainless-Read-Timeout": "0.3"},
            timeout=30,
        )
        assert r.status_code == 504


# ---- metrics ------------------------------------------------------------------------------------------------


def scrape(url) -> dict:
    """/metrics parsed by prometheus_client's own text parser -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_carry_vllm_names_after_real_requests():
    with serve(SlowCore(slots=4, cache_len=256), "--request-timeout", "0.5") as (url, *_):
        model = (("model_name", MODEL),)
        idle = scrape(url)
        assert idle[("vllm:num_requests_waiting", model)] == 0 and idle[("vllm:kv_cache_usage_perc", model)] == 0
        assert idle[("vllm:num_preemptions_total", model)] == 0
        body = {"model": MODEL, "prompt": [1, 2], "max_tokens": 5, "ignore_eos": True}
        assert post(url, {**body, "n": 2}).status_code == 200  # 2 choices, 5 tokens each: "length"
        eos = post(url, {**body, "prompt": [47], "max_tokens": 10, "ignore_eos": False})
        assert eos.json()["choices"][0]["finish_reason"] == "stop"
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            assert r.read().endswith(b"data: [DONE]\n\n")
        timed_out = post(url, {**body, "max_tokens": 200})  # 200 steps of 20 ms: past the 0.5 s deadline
        assert timed_out.status_code == 504
        m = scrape(url)
        assert m[("vllm:request_success_total", (("finished_reason", "length"), *model))] == 3
        assert m[("vllm:request_success_total", (("finished_reason", "stop"), *model))] == 1  # EOS after 47, 48, 49
        assert m[("vllm:request_success_total", (("finished_reason", "abort"), *model))] == 1  # the deadline
        assert m[("jaxserve_request_timeouts_total", ())] == 1
        assert m[("vllm:prompt_tokens_total", model)] == 2 + 1 + 2  # the aborted request's usage never came
        assert m[("vllm:generation_tokens_total", model)] == 2 * 5 + 3 + 5  # 48, 49 and EOS
        assert m[("vllm:prompt_tokens_total", model)] == m[("jaxserve_prompt_tokens_total", ())]
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):  # 4 requests, aborted included
            assert m[(f"vllm:{name}_count", model)] == 4
        assert m[("vllm:request_queue_time_seconds_count", model)] == 3  # one per prompt admitted and ended
        # one interval per token after each choice's first: (5-1)*2 + (3-1) + (5-1), plus the aborted one's
        assert m[("vllm:inter_token_latency_seconds_count", model)] >= 14
        assert m[("jaxserve_requests_total", (("status", "504"),))] == 1
        assert m[("vllm:num_requests_running", model)] == 0 and m[("vllm:num_requests_waiting", model)] == 0
        assert m[("jaxserve_engine_steps_total", ())] > 0


def test_kv_cache_usage_is_the_fraction_of_pages_held():
    with serve(SlowCore(slots=4, cache_len=256)) as (url, _, scheduler):
        body = {"model": MODEL, "prompt": [1], "max_tokens": 100, "ignore_eos": True, "n": 2}
        hog = threading.Thread(target=post, args=(url, body))
        hog.start()
        deadline, usage = time.time() + 10, 0.0
        while usage == 0 and time.time() < deadline:
            usage = scrape(url)[("vllm:kv_cache_usage_perc", (("model_name", MODEL),))]
            time.sleep(0.02)
        # 2 choices of 1 + 100 tokens, each in pages of 4 of its own: 2 to 2 x 26 of the pool's 256
        assert 2 / 256 <= usage <= 2 * 26 / 256
        assert scrape(url)[("vllm:num_requests_running", (("model_name", MODEL),))] == 2
        assert scrape(url)[("jaxserve_kv_pages", ())] == scheduler.core.pages == 256
        hog.join(20)
