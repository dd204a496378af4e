"""Several processes serving one model with jax.distributed over loopback (one CPU device each, the model
axis across them), against one process with the same mesh on as many devices of its own: the same requests
give the same tokens. Then the faults: a follower killed or stopped mid-request, the leader killed, and
SIGTERM on every process (as Kubernetes stops pods), each ending every process, with the exit status that
says who ended it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from server import Server, free_port
from test_batch import batch_line

HEARTBEAT = 5.0  # seconds: --heartbeat-timeout of the groups here
TINY = ("--model", "tiny-llama", "--mesh", "data=1,model=2", "--max-slots", "4", "--max-context", "128")
# 12 pages of 16 tokens for 4 slots growing to 7 pages each: sequences are preempted
TIGHT = ("--page-size", "16", "--num-pages", "12")


def one_device_each() -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


class Group:
    """`jaxserve serve` as N processes: process 0 serves HTTP, the others follow."""

    def __init__(self, n: int, *args: str, checkpoints, cache):
        self.port, coordinator = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ["--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", str(n)]
        flags += ["--heartbeat-timeout", str(HEARTBEAT), "--compile-cache", str(cache), *args]
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "jaxserve.cli", "serve", "--port", str(self.port), "--checkpoints"]
                + [str(checkpoints), "--process-id", str(i), *flags],
                env=one_device_each(),
            )
            for i in range(n)
        ]

    def wait_ready(self, timeout: float = 900) -> "Group":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a process exited: {[p.returncode for p in self.procs]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the group did not become healthy")

    def wait_exit(self, procs, timeout: float) -> tuple[list[int | None], float]:
        """Each process's exit status (None: still running after `timeout`) and the seconds the last took."""
        t0 = time.monotonic()
        for p in procs:
            try:
                p.wait(max(0.0, timeout - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in procs], time.monotonic() - t0

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()


def completion(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny-llama"} | body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(url: str, **body) -> tuple[str, list[dict]]:
    """The streamed text and every event's JSON."""
    events = []
    with httpx.stream(
        "POST", url + "/v1/completions", json={"model": "tiny-llama", "stream": True, **body}, timeout=300
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                events.append({"done": True})
    text = "".join(c["text"] for e in events for c in e.get("choices", []))
    return text, events


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def pending(url: str) -> float:
    return metric(url, "jaxserve_step_variants_pending")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("executables")  # the groups here share it: the first compiles, the rest load


@pytest.fixture(scope="module")
def group(tiny_dir, checkpoint_root, cache):
    g = Group(2, *TINY, *TIGHT, checkpoints=checkpoint_root, cache=cache)
    try:
        yield g.wait_ready()
    finally:
        g.kill()


def one_process(devices: int, *args: str, checkpoints, cache) -> Server:
    """`jaxserve serve` alone on `devices` CPU devices, once every shape is ready (the group's are before it
    serves: no narrower fallback shape may differ)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    s = Server(*args, "--compile-cache", str(cache), checkpoints=checkpoints, env=env).wait_ready()
    deadline = time.time() + 600
    while pending(s.url) and time.time() < deadline:
        time.sleep(1)
    return s


@pytest.fixture(scope="module")
def alone(tiny_dir, checkpoint_root, tmp_path_factory):
    """One process, two devices, the same mesh and pool."""
    s = one_process(2, *TINY, *TIGHT, checkpoints=checkpoint_root, cache=tmp_path_factory.mktemp("alone"))
    yield s
    s.stop()


PROMPTS = ["Once upon a time", "In the beginning God created", "And the earth was", "The king said"]


def test_the_group_answers_as_one_process_does(group, alone):
    """Greedy with logprobs and echo, n seeded samples, a stream, a structured output, a prefix-cache hit and
    preemptions: every token and logprob as one process gives them."""
    greedy = dict(prompt=PROMPTS[0], max_tokens=24, temperature=0, logprobs=3, echo=True)
    sampled = dict(prompt=PROMPTS[1], max_tokens=24, temperature=0.9, n=3, seed=7)
    schema = {
        "type": "object",
        "properties": {"a": {"type": "boolean"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    structured = dict(prompt=PROMPTS[2], max_tokens=30, temperature=0, response_format=response_format)
    for body in (greedy, sampled, structured):
        got, want = completion(group.url, **body), completion(alone.url, **body)
        assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
        assert [c["logprobs"] for c in got["choices"]] == [c["logprobs"] for c in want["choices"]]
    json.loads(completion(group.url, **structured)["choices"][0]["text"])  # the grammar held

    text, events = stream_text(group.url, prompt=PROMPTS[3], max_tokens=24, temperature=0)
    assert events[-1] == {"done": True}
    assert text == completion(alone.url, prompt=PROMPTS[3], max_tokens=24, temperature=0)["choices"][0]["text"]

    hits = metric(group.url, "vllm:prefix_cache_hits_total")
    long = " ".join(PROMPTS) * 2  # 38 tokens, two pages of 16 and more: the second request finds them cached
    assert (
        completion(group.url, prompt=long, max_tokens=4, temperature=0)["choices"]
        == completion(group.url, prompt=long, max_tokens=4, temperature=0)["choices"]
    )
    assert metric(group.url, "vllm:prefix_cache_hits_total") > hits


def test_preempted_requests_in_the_group_finish_as_alone(group, alone):
    """Four sequences of 100 tokens in a pool of 12 pages of 16: some are preempted and recomputed."""
    import concurrent.futures

    bodies = [dict(prompt=p, max_tokens=100, temperature=0.8, seed=i, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    before = metric(group.url, "vllm:num_preemptions_total")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: completion(group.url, **b), bodies))
    assert metric(group.url, "vllm:num_preemptions_total") > before
    for body, g in zip(bodies, got):
        assert g["choices"][0]["text"] == completion(alone.url, **body)["choices"][0]["text"]


def test_sigterm_on_every_process_stops_the_group(group):
    """As Kubernetes stops a group's pods, SIGTERM to each: a follower keeps running the leader's plans (the
    group still answers), until the leader, on its own SIGTERM, drains, sends STOP, and every process exits 0."""
    group.procs[1].send_signal(signal.SIGTERM)
    assert completion(group.url, prompt=PROMPTS[0], max_tokens=8, temperature=0)["choices"][0]["text"]
    assert group.procs[1].poll() is None
    group.procs[0].send_signal(signal.SIGTERM)
    codes, seconds = group.wait_exit(group.procs, 60)  # printed: shown with -s, and on a failure
    print(f"every process, after SIGTERM on each: exit {codes} in {seconds:.1f} s")
    assert codes == [0, 0], codes


@pytest.fixture
def fresh(tiny_dir, checkpoint_root, cache, group):
    """A group of its own (its executables loaded from the first group's store), for a test that breaks it."""
    g = Group(2, *TINY, *TIGHT, checkpoints=checkpoint_root, cache=cache)
    try:
        yield g.wait_ready()
    finally:
        g.kill()


def test_a_follower_killed_mid_stream_ends_the_stream_and_the_leader(fresh):
    with httpx.stream(
        "POST",
        fresh.url + "/v1/completions",
        json={"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 120, "ignore_eos": True, "stream": True},
        timeout=120,
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # streaming has begun
        fresh.procs[1].kill()
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert "error" in json.loads(rest[-2][6:])
    codes, seconds = fresh.wait_exit(fresh.procs[:1], 4 * HEARTBEAT)
    print(f"the leader, after the follower's kill -9: exit {codes} in {seconds:.1f} s")
    assert codes == [1], codes  # jaxserve's watchdog or the failed step, not JAX's abort (a signal)


def test_a_stopped_follower_fails_the_request_and_ends_the_leader(fresh):
    """SIGSTOP: the follower is alive but answers nothing (no collective fails): the watchdog notices."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending_request = pool.submit(
            httpx.post,
            fresh.url + "/v1/completions",
            json={"model": "tiny-llama", "prompt": PROMPTS[1], "max_tokens": 120, "ignore_eos": True},
            timeout=120,
        )
        time.sleep(0.5)
        fresh.procs[1].send_signal(signal.SIGSTOP)
        response = pending_request.result()
    assert response.status_code == 503, response.text
    codes, seconds = fresh.wait_exit(fresh.procs[:1], 4 * HEARTBEAT)
    print(f"the leader, after SIGSTOP of the follower: exit {codes} in {seconds:.1f} s")
    assert codes == [1], codes
    fresh.procs[1].send_signal(signal.SIGCONT)  # its leader gone, it ends too
    codes, seconds = fresh.wait_exit(fresh.procs[1:], 4 * HEARTBEAT)
    print(f"the follower, once resumed (its leader gone): exit {codes} in {seconds:.1f} s")
    assert codes == [1], codes


def test_a_killed_leader_ends_the_followers(fresh):
    """At once if JAX's error polling finds the coordination service (in the leader) gone: it aborts the
    process (SIGABRT); else by jaxserve's watchdog (exit status 1). Either way, non-zero and in the bound."""
    fresh.procs[0].kill()
    codes, seconds = fresh.wait_exit(fresh.procs[1:], 4 * HEARTBEAT)
    print(f"the follower, after the leader's kill -9: exit {codes} in {seconds:.1f} s")
    assert codes[0] is not None and codes[0] != 0, codes


SMOL = ("--model", "smollm2-135m-instruct", "--quantize", "none", "--max-slots", "2", "--max-context", "128")
SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smol_group(smollm2_dir, checkpoint_root, tmp_path_factory):
    """SmolLM2 over 3 processes, the model axis across them: its 9 query and 3 KV heads, MLP and vocabulary
    split 3 ways (3 is the only count dividing its KV heads)."""
    g = Group(3, *SMOL, "--mesh", "data=1,model=3", checkpoints=checkpoint_root, cache=tmp_path_factory.mktemp("smol"))
    try:
        yield g.wait_ready()
    finally:
        g.kill()


@pytest.fixture(scope="module")
def smol_alone(smollm2_dir, checkpoint_root, tmp_path_factory):
    s = one_process(1, *SMOL, checkpoints=checkpoint_root, cache=tmp_path_factory.mktemp("smol-alone"))
    yield s
    s.stop()


def test_smollm2_split_over_three_processes_answers_as_one_device(smol_group, smol_alone):
    """Greedy tokens identical; echo logprobs and seeded samples within test_sharding's tolerance (1e-4 of the
    logit scale: the all-reduces of sharded heads sum float32 in another order)."""
    tolerance = 1e-4 * 25
    for body in (
        dict(prompt=SMOL_PROMPTS[0], max_tokens=12, temperature=0, logprobs=2, echo=True),
        dict(prompt=SMOL_PROMPTS[1], max_tokens=12, temperature=0.7, n=2, seed=11, logprobs=1),
    ):
        body["model"] = "smollm2-135m-instruct"
        got, want = completion(smol_group.url, **body), completion(smol_alone.url, **body)
        for g, w in zip(got["choices"], want["choices"]):
            assert g["text"] == w["text"] and g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
            got_lp, want_lp = g["logprobs"]["token_logprobs"], w["logprobs"]["token_logprobs"]
            assert [x is None for x in got_lp] == [x is None for x in want_lp]
            np.testing.assert_allclose(
                [x for x in got_lp if x is not None], [x for x in want_lp if x is not None], atol=tolerance
            )


def slurm_port() -> int:
    """A free port where jax's SLURM detection puts the coordinator: 61440 + SLURM_JOB_ID mod 4096."""
    for port in range(61440 + os.getpid() % 4096, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 61440..65535")


def test_a_batch_under_slurm_with_distributed_auto(tmp_path, tiny_dir, checkpoint_root):
    """`jaxserve batch --distributed auto` as SLURM starts it (two tasks of one step; jax reads the group from
    SLURM's variables): the data axis across the processes, so the 8 lines' decode rows are split between
    them (each computes 4 and they exchange logits and K/V). Its output is one process's on 2 devices."""
    lines = [batch_line(f"r{i}", prompt=p, max_tokens=8, temperature=0) for i, p in enumerate(PROMPTS * 2)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--model", "tiny-llama", "--checkpoints", str(checkpoint_root), "--mesh", "data=2,model=1"]
    args += ["--max-slots", "8", "--max-context", "128", "--heartbeat-timeout", str(HEARTBEAT)]

    def batch(output):
        return [sys.executable, "-m", "jaxserve.cli", "batch", str(tmp_path / "in.jsonl"), str(tmp_path / output)]

    port = slurm_port()
    slurm = dict(SLURM_JOB_ID=str(port - 61440), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2")
    slurm |= dict(JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")  # loopback only, not every interface
    procs = [
        subprocess.Popen(
            batch("group.jsonl") + args + ["--distributed", "auto"],
            env=one_device_each() | slurm | dict(SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    alone = subprocess.run(
        batch("alone.jsonl") + args,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert alone.returncode == 0, alone.stderr
    assert "process 1 of 2 joined" in errors[1]
    got = [json.loads(x) for x in (tmp_path / "group.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "alone.jsonl").read_text().splitlines()]
    assert len(got) == len(lines) and all(r["response"]["status_code"] == 200 for r in got)
    texts = {r["custom_id"]: [c["text"] for c in r["response"]["body"]["choices"]] for r in got}
    assert texts == {r["custom_id"]: [c["text"] for c in r["response"]["body"]["choices"]] for r in want}
