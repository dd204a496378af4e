"""`jaxserve batch` as a user runs it: format, bad lines, plain form, resume after kill -9."""

import json
import signal
import subprocess
import sys
import time

import httpx
from server import Server

TINY = "tiny-llama"


def batch_line(cid, **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"model": TINY, **body}})


def run_batch(tmp_path, checkpoints, *args, input_name="in.jsonl", output_name="out.jsonl", model=TINY):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxserve.cli",
            "batch",
            str(tmp_path / input_name),
            str(tmp_path / output_name),
            "--model",
            model,
            "--checkpoints",
            str(checkpoints),
            "--max-slots",
            "8",
            "--max-context",
            "256",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


REQUESTS = [
    ("greedy", dict(prompt="The Lord is my shepherd", max_tokens=8, temperature=0)),
    ("echo", dict(prompt="Call me Ishmael.", max_tokens=0, echo=True, logprobs=2)),
    ("n", dict(prompt=["It was the best", "Tyger Tyger"], n=2, max_tokens=4, temperature=0.7, seed=5)),
    ("stop", dict(prompt="The Lord is my shepherd", max_tokens=12, temperature=0, stop=[" want"])),
    ("bias", dict(prompt="Alice was", max_tokens=4, temperature=0, logit_bias={"5": -100}, best_of=2)),
]


def test_format_matches_the_server_and_bad_lines_become_error_lines(tmp_path, tiny_dir):
    lines = [batch_line(cid, **body) for cid, body in REQUESTS]
    lines += [
        "{not json",
        json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {"model": TINY}}),
        batch_line("bad-temperature", prompt="hi", temperature=9),
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"model": TINY, "prompt": "x"}}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    result = run_batch(tmp_path, tiny_dir.parent)
    assert result.returncode == 1, result.stderr  # some lines failed: not a clean exit
    assert "batch" in result.stderr and "5 ok, 4 failed" in result.stderr
    out = {r["custom_id"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert set(out) == {cid for cid, _ in REQUESTS} | {"line-6", "wrong-url", "bad-temperature", "line-9"}
    for cid in ("line-6", "wrong-url", "bad-temperature", "line-9"):
        assert out[cid]["response"]["status_code"] == 400
        assert "message" in out[cid]["response"]["body"]["error"]
    assert out["bad-temperature"]["response"]["body"]["error"]["param"] == "temperature"
    assert out["wrong-url"]["response"]["body"]["error"]["param"] == "url"

    server = Server("--model", TINY, "--max-slots", "8", "--max-context", "256", checkpoints=tiny_dir.parent)
    try:
        server.wait_ready()
        for cid, body in REQUESTS:
            want = httpx.post(server.url + "/v1/completions", json={"model": TINY, **body}, timeout=120).json()
            got = out[cid]
            assert got["id"].startswith("batch_req_") and got["error"] is None
            assert got["response"]["status_code"] == 200
            got_body = got["response"]["body"]
            assert got["response"]["request_id"] == got_body["id"]
            assert set(got_body) == set(want) and got_body["object"] == "text_completion"
            assert [c["text"] for c in got_body["choices"]] == [c["text"] for c in want["choices"]]
            assert [c["finish_reason"] for c in got_body["choices"]] == [c["finish_reason"] for c in want["choices"]]
            assert got_body["usage"] == want["usage"]
            if body.get("logprobs"):
                assert got_body["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]
    finally:
        server.stop()


def test_plain_form(tmp_path, tiny_dir):
    (tmp_path / "prompts.txt").write_text('The Lord is my shepherd\n{"prompt": "Call me", "max_tokens": 2}\n\n')
    result = run_batch(
        tmp_path, tiny_dir.parent, "--prompts", "--max-tokens", "6", "--temperature", "0", input_name="prompts.txt"
    )
    assert result.returncode == 0, result.stderr
    out = {r["custom_id"]: r["response"]["body"] for r in read_output(tmp_path / "out.jsonl")}
    assert out["line-1"]["choices"][0]["text"].startswith("; I shall")
    assert out["line-2"]["usage"]["completion_tokens"] == 2


def test_duplicate_custom_ids_are_reported_before_work(tmp_path, tiny_dir):
    (tmp_path / "in.jsonl").write_text(batch_line("a", prompt="x") + "\n" + batch_line("a", prompt="y") + "\n")
    result = run_batch(tmp_path, tiny_dir.parent)
    assert result.returncode == 2 and "duplicate custom_id" in result.stderr and "a" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_resume_after_kill_minus_nine(tmp_path, tiny_dir):
    n = 120
    lines = [
        batch_line(
            f"r{i}",
            prompt=f"It was the {'best' if i % 2 else 'worst'} of times",
            max_tokens=60,
            temperature=0.5,
            seed=i,
        )
        for i in range(n)
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out_path = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxserve.cli",
            "batch",
            str(tmp_path / "in.jsonl"),
            str(out_path),
            "--model",
            TINY,
            "--checkpoints",
            str(tiny_dir.parent),
            "--max-slots",
            "4",
            "--max-context",
            "256",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and (not out_path.exists() or len(out_path.read_text().splitlines()) < 10):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out_path.read_text().splitlines()
    assert 10 <= len(before) < n, "the kill should land mid-batch"
    with open(out_path, "a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "r')  # a crash mid-write
    result = run_batch(tmp_path, tiny_dir.parent)
    assert result.returncode == 0, result.stderr
    rows = read_output(out_path)  # every line parses: the torn one was cut
    ids = [r["custom_id"] for r in rows]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # each exactly once
    assert f"{len(before)} already done" in result.stderr or "already done" in result.stderr
    assert all(r["response"]["status_code"] == 200 for r in rows)


def test_chat_lines_with_structured_outputs(tmp_path, smollm2_dir):
    """/v1/chat/completions lines beside /v1/completions ones; a response_format line's every choice validates,
    and so does a line with tools' call;
    a chat line the tiny model could not serve (no template) is not needed here: SmolLM2 has one."""
    import jsonschema

    schema = {
        "type": "object",
        # bounded, as a schema meant to end should be: at temperature 1 an unbounded integer may take every token
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "legs": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "legs"],
        "additionalProperties": False,
    }
    smol = "smollm2-135m-instruct"
    messages = [{"role": "user", "content": "Describe a cat as JSON."}]
    lines = [
        json.dumps(
            {
                "custom_id": "chat",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": smol, "messages": messages, "max_tokens": 8, "temperature": 0},
            }
        ),
        json.dumps(
            {
                "custom_id": "json",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": smol,
                    "messages": messages,
                    "max_tokens": 100,
                    "n": 3,
                    "temperature": 1.0,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "animal", "schema": schema}},
                },
            }
        ),
        json.dumps(
            {
                "custom_id": "tools",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": smol,
                    "messages": [{"role": "user", "content": "How many legs has a cat?"}],
                    "max_tokens": 40,  # the tools' system turn makes a 211-token prompt: 251 of the 256
                    "temperature": 0,
                    "tools": [{"type": "function", "function": {"name": "describe", "parameters": schema}}],
                    "tool_choice": "required",
                    "parallel_tool_calls": False,  # one call, then the turn ends
                },
            }
        ),
        json.dumps(
            {
                "custom_id": "plain",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": smol, "prompt": "Hi", "max_tokens": 2},
            }
        ),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    result = run_batch(tmp_path, smollm2_dir.parent, model=smol)
    assert result.returncode == 0, result.stderr
    out = {r["custom_id"]: r["response"]["body"] for r in read_output(tmp_path / "out.jsonl")}
    assert out["chat"]["object"] == "chat.completion" and out["chat"]["choices"][0]["message"]["content"]
    assert out["plain"]["object"] == "text_completion"
    assert len(out["json"]["choices"]) == 3
    (call,) = out["tools"]["choices"][0]["message"]["tool_calls"]  # a line with tools: its call, validated
    assert out["tools"]["choices"][0]["finish_reason"] == "tool_calls" and call["function"]["name"] == "describe"
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    for choice in out["json"]["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
