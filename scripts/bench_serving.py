"""HTTP load on an OpenAI-compatible Completions server: streaming requests at fixed concurrency.

    python scripts/bench_serving.py [--base-url http://127.0.0.1:8000] [--concurrency 1 8 32 64]
                                    [--quantize none int8] [--llama-server PATH] [--requests-per-client 2]
                                    [--max-tokens 128] [--distinct-prompts]

Without --base-url it starts `jaxserve serve` on a free loopback port (slots = the highest concurrency),
once per --quantize choice (float32 and int8 weights side by side), and stops it afterwards. With
--llama-server PATH it also starts llama.cpp's server (built by ../shared/tools/build-llama-server.sh) on
the same GGUF file, with as many parallel sequences and all the cores, and prints jaxserve's tok/s as a
ratio of llama-server's measured in the same run. With --base-url it loads any one running server (vLLM,
...) instead.
Loopback addresses only, unless --allow-remote. Every run is bounded in requests (concurrency x
requests-per-client) and time (--time-limit). Reports aggregate generated tok/s, time to first token
p50/p99 and inter-token latency p50/p99, beside the floors of a decode step of this model (bytes over
measured bandwidth, FLOPs over measured matmul throughput; int8 weights for another server).
Every request sends the same prompt unless --distinct-prompts: llama-server then answers from its prompt
cache after computing one token (jaxserve caches only whole 128-token pages), so its TTFT is a decode step,
not a prefill.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from jaxserve.checkpoint import DEFAULT_MODEL, ensure_checkpoint, find_card, gguf_path
from jaxserve.device.roofline import Machine, floors
from jaxserve.engine_args import checkpoint_root
from jaxserve.model import ModelConfig

PROMPT = (
    "The quick brown fox jumps over the lazy dog and runs far away into the woods, where the old "
    "oak trees stand tall and the river"
)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def prompt_of(i: int | None) -> str:
    """The prompt of request i: PROMPT's words rotated by i (the same words, so about the same tokens), or
    PROMPT itself for None. Rotated, consecutive prompts differ from their first word: a server's prompt
    cache (llama-server keeps each slot's last prompt and computes only what follows the common prefix; on
    the same prompt, only its last token) cannot skip the prefill, so TTFT measures it."""
    if i is None:
        return PROMPT
    words = PROMPT.split()
    k = i % len(words)
    return " ".join(words[k:] + words[:k])


async def one_request(http: httpx.AsyncClient, model: str, max_tokens: int, prompt: str = PROMPT) -> dict:
    # ignore_eos (jaxserve, vLLM and llama.cpp honour it) makes every request generate max_tokens
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
    return {
        "ttft": arrivals[0] - start if arrivals else float("nan"),
        "tokens": tokens or len(arrivals),
        "itl": [b - a for a, b in zip(arrivals, arrivals[1:])],
    }


async def run_level(
    base_url: str,
    model: str,
    concurrency: int,
    per_client: int,
    max_tokens: int,
    time_limit: float,
    distinct: bool = False,
) -> dict:
    results = []
    deadline = time.perf_counter() + time_limit
    counter = itertools.count(1)

    async def client(http):
        for _ in range(per_client):
            if time.perf_counter() > deadline:
                return
            prompt = prompt_of(next(counter) if distinct else None)
            results.append(await one_request(http, model, max_tokens, prompt))

    # a fresh connection per request: llama-server closes kept-alive ones between streams
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=time_limit, limits=limits) as http:
        await one_request(http, model, 4)  # warm the connection path
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(concurrency))), time_limit + 60)
        wall = time.perf_counter() - start
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50),
        "itl_p99": percentile(itl, 99),
    }


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        sys.exit(f"{url} is not a loopback address; pass --allow-remote to load another machine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warmed_up(url: str) -> bool:
    """/health answers 200, and a jaxserve has no step shapes left compiling in the background (measuring
    while it compiles would measure the compiler)."""
    if httpx.get(url + "/health", timeout=2).status_code != 200:
        return False
    metrics = httpx.get(url + "/metrics", timeout=5)
    pending = [line for line in metrics.text.splitlines() if line.startswith("jaxserve_step_variants_pending")]
    return metrics.status_code != 200 or not pending or float(pending[0].split()[-1]) == 0


def wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.time() + 900
    while time.time() < deadline:
        try:
            if warmed_up(url):
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the server for {url} failed to start")
        time.sleep(1)
    proc.kill()
    sys.exit(f"the server for {url} did not become healthy in 15 minutes")


def start_jaxserve(args, slots: int, quantize: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "jaxserve.cli",
        "--log-level",
        "WARNING",
        "serve",
        "--port",
        str(port),
        "--max-slots",
        str(slots),
        "--model",
        args.model or DEFAULT_MODEL,
        "--quantize",
        quantize,
        *flags,
    ]
    if args.checkpoints:
        cmd += ["--checkpoints", args.checkpoints]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def start_llama_server(args, slots: int) -> tuple[subprocess.Popen, str]:
    """llama.cpp's server on the model card's GGUF file: `slots` parallel sequences sharing a context with
    room for each one's prompt and max_tokens, every core."""
    binary = Path(args.llama_server).resolve()
    card = find_card(args.model or DEFAULT_MODEL)
    if card is None or card.weights.get("format") != "gguf":
        sys.exit("--llama-server needs a model card with a GGUF file (e.g. smollm2-135m-instruct)")
    port = free_port()
    cmd = [
        str(binary),
        "-m",
        str(gguf_path(card)),
        "-t",
        str(os.cpu_count()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(slots),
        "-c",
        str(slots * (args.max_tokens + 64)),
    ]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def model_config(args):
    """The benchmarked model's config (its checkpoint converted on first use), for the floors."""
    directory = ensure_checkpoint(args.model or DEFAULT_MODEL, checkpoint_root(args.checkpoints), progress=False)
    return ModelConfig.load(directory / "config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="a running server (default: start jaxserve here)")
    parser.add_argument("--model", help="model id to request (default: the server's first)")
    parser.add_argument("--checkpoints", help="checkpoint folder for the server this script starts")
    parser.add_argument(
        "--quantize",
        nargs="+",
        choices=["none", "int8"],
        default=["none", "int8"],
        help="weights of the servers this script starts, one after the other",
    )
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary: also run it on the same GGUF")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--time-limit", type=float, default=600, help="seconds per concurrency level at most")
    parser.add_argument("--allow-remote", action="store_true")
    parser.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="each request's prompt differs from the last one's (PROMPT's words rotated), so no server's prompt "
        "cache skips the prefill (default: the same prompt every time)",
    )
    args = parser.parse_args()
    if args.base_url:
        url = args.base_url.rstrip("/").removesuffix("/v1")
        if not args.allow_remote:
            check_loopback(url)
    cfg, machine = model_config(args), Machine.measure()  # measured before any server loads this machine
    print(f"floors: {machine}")
    slots = max(args.concurrency)
    servers = [("server", lambda: (None, url))] if args.base_url else []
    servers += (
        []
        if args.base_url
        else [(("float32" if q == "none" else q), lambda q=q: start_jaxserve(args, slots, q)) for q in args.quantize]
    )
    if args.llama_server:
        servers.append(("llama-server", lambda: start_llama_server(args, slots)))
    rows = []
    for weights, start in servers:
        proc, url = start()
        try:
            model = args.model or httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            print(
                f"server {url} ({weights}), model {model}, {args.max_tokens} tokens per request, streaming, "
                f"{'distinct prompts' if args.distinct_prompts else 'the same prompt each time'}"
            )
            for c in args.concurrency:
                row = asyncio.run(
                    run_level(
                        url,
                        model,
                        c,
                        args.requests_per_client,
                        args.max_tokens,
                        args.time_limit,
                        args.distinct_prompts,
                    )
                )
                step_cfg = cfg if weights == "float32" else dataclasses.replace(cfg, quant="int8")  # others: ~int8
                mem, flop = floors(step_cfg, c, args.max_tokens + 32, machine)
                row.update(
                    weights=weights, mem_floor_ms=1000 * mem, flop_floor_ms=1000 * flop, floor_tok_s=c / max(mem, flop)
                )
                rows.append(row)
                print(f"{weights} C={c}: {row['tok_s']:.1f} tok/s over {row['requests']} requests", flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    print(
        "\n| weights | concurrency | requests | tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) "
        "| floor: bytes (ms) | floor: FLOPs (ms) | floor tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['weights']} | {r['concurrency']} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} "
            f"| {r['ttft_p99']:.3f} | {1000 * r['itl_p50']:.1f} | {1000 * r['itl_p99']:.1f} | {r['mem_floor_ms']:.1f} "
            f"| {r['flop_floor_ms']:.1f} | {r['floor_tok_s']:.0f} |"
        )
    peer = {r["concurrency"]: r for r in rows if r["weights"] == "llama-server"}
    if peer:  # tok/s as a ratio of llama-server's (above 1: faster); TTFT as a ratio (below 1: sooner)
        ours = [w for w, _ in servers if w != "llama-server"]
        columns = " | ".join(f"jaxserve {w} tok/s | ratio | TTFT p50 (s) | ratio" for w in ours)
        print(f"\n| concurrency | llama-server tok/s | llama-server TTFT p50 (s) | {columns} |")
        print("|---" * (3 + 4 * len(ours)) + "|")
        for c, theirs in peer.items():
            cells = []
            for w in ours:
                r = next(r for r in rows if r["weights"] == w and r["concurrency"] == c)
                cells += [f"{r['tok_s']:.1f}", f"{r['tok_s'] / theirs['tok_s']:.2f}x"]
                cells += [f"{r['ttft_p50']:.3f}", f"{r['ttft_p50'] / theirs['ttft_p50']:.2f}x"]
            print(f"| {c} | {theirs['tok_s']:.1f} | {theirs['ttft_p50']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
