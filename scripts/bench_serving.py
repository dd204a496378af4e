"""HTTP load on an OpenAI-compatible Completions server: streaming requests at fixed concurrency.

    python scripts/bench_serving.py [--base-url http://127.0.0.1:8000] [--concurrency 1 8 32 64]
                                    [--quantize gguf int8 none] [--llama-server PATH] [--requests-per-client 2]
                                    [--max-tokens 128] [--distinct-prompts] [--rounds 2] [--json PATH]

Without --base-url it starts `jaxserve serve` on a free loopback port (slots = the highest concurrency),
once per --quantize choice (default: the card's own, the GGUF's blocks for SmolLM2). With --llama-server PATH
it also starts llama.cpp's server (built by ../shared/tools/build-llama-server.sh) on the same GGUF file, with
as many parallel sequences and all the cores, and prints jaxserve's tok/s as a ratio of llama-server's
measured in the same run. With --base-url it loads running servers (any OpenAI-compatible one: vLLM,
llama-server, a jaxserve started by hand; several URLs, each optionally NAME=URL, are measured side by side)
instead.
Every server is started (all inherit this script's nice level) and warmed up before any is measured, and
they stay up together: each concurrency level is then measured on one server after the other, --rounds times
(the order reversed every other round), so a load that changes during the run hits every server alike and
the rounds show the noise. An idle server waits on its queue, so it does not take the CPU from the one
being measured.
Loopback addresses only, unless --allow-remote. Every run is bounded in requests (concurrency x
requests-per-client) and time (--time-limit a level; requests still streaming then are cut and count the
tokens they received). Reports aggregate generated tok/s, time to first token
p50/p99 and inter-token latency p50/p99, beside the floors of a decode step of this model (bytes over
measured bandwidth, FLOPs over measured matmul throughput; int8 weights for another server).
Every request sends the same prompt unless --distinct-prompts: llama-server then answers from its prompt
cache after computing one token (jaxserve caches only whole 128-token pages), so its TTFT is a decode step,
not a prefill.
--json PATH keeps every row, and the table as a picture beside it (PATH with .svg: tok/s and TTFT p50 against
concurrency, a line per server; needs matplotlib, the `bench` extra, else it says so and skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import itertools
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from jaxserve.checkpoint import DEFAULT_MODEL, ensure_checkpoint, find_card, gguf_path
from jaxserve.device.roofline import Machine, floors
from jaxserve.engine_args import checkpoint_root
from jaxserve.host import cpu_model
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
    the same prompt, only its last token) cannot skip the prefill, so TTFT measures it. The number in front
    keeps them distinct past the number of words (and across levels and rounds: see REQUESTS)."""
    if i is None:
        return PROMPT
    words = PROMPT.split()
    k = i % len(words)
    return f"{i}. " + " ".join(words[k:] + words[:k])


REQUESTS = itertools.count(1)  # numbers the run's requests: no two prompts alike in a run (--distinct-prompts)


async def one_request(http: httpx.AsyncClient, model: str, max_tokens: int, prompt: str, out: dict) -> None:
    """Streams one completion, filling `out` as it goes (start, arrivals of text chunks; tokens from the usage at
    the end), so that a request cut off at the level's time limit still counts what it received."""
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
    out.update(start=time.perf_counter(), arrivals=[], tokens=0)
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                out["arrivals"].append(time.perf_counter())
    out["done"] = True


async def run_level(
    base_url: str,
    model: str,
    concurrency: int,
    per_client: int,
    max_tokens: int,
    time_limit: float,
    distinct: bool = False,
) -> dict:
    """`concurrency` clients, each sending `per_client` requests one after the other, for `time_limit` seconds
    at most: requests still streaming then are cancelled and count the tokens they received ("cut")."""
    records: list[dict] = []

    async def client(http):
        for _ in range(per_client):
            records.append({})
            await one_request(http, model, max_tokens, prompt_of(next(REQUESTS) if distinct else None), records[-1])

    # a fresh connection per request: llama-server closes kept-alive ones between streams
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=time_limit, limits=limits) as http:
        await one_request(http, model, 4, PROMPT, {})  # warm the connection path
        start = time.perf_counter()
        tasks = [asyncio.create_task(client(http)) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        wall = time.perf_counter() - start
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a failed request fails the run
    results = [
        {
            "ttft": r["arrivals"][0] - r["start"] if r.get("arrivals") else float("nan"),
            "tokens": r.get("tokens") or len(r.get("arrivals", [])),
            "itl": [b - a for a, b in zip(r.get("arrivals", []), r.get("arrivals", [])[1:])],
        }
        for r in records
    ]
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results if r["ttft"] == r["ttft"]]  # not NaN: requests that received something
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "cut": sum(1 for r in records if not r.get("done")),
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
        *shlex.split(args.llama_args),
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


def measure_rounds(args, servers: list[tuple[str, str, str]], cfg, machine) -> list[dict]:
    """Every concurrency level on every (name, url, model) server, one after the other, --rounds times."""
    rows = []
    for rnd in range(args.rounds):
        for c in args.concurrency:
            for weights, url, model in servers if rnd % 2 == 0 else servers[::-1]:
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
                    weights=weights,
                    round=rnd + 1,
                    load=os.getloadavg()[0],
                    mem_floor_ms=1000 * mem,
                    flop_floor_ms=1000 * flop,
                    floor_tok_s=c / max(mem, flop),
                )
                rows.append(row)
                print(
                    f"round {rnd + 1} {weights} C={c}: {row['tok_s']:.1f} tok/s over {row['requests']} requests "
                    f"({row['cut']} cut at the time limit), "
                    f"TTFT p50 {row['ttft_p50']:.3f} s, load {row['load']:.1f}",
                    flush=True,
                )
    return rows


def print_tables(rows: list[dict], names: list[str]) -> None:
    print(
        "\n| weights | round | concurrency | requests (cut) | tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) "
        "| ITL p99 (ms) | load (1 min) | floor: bytes (ms) | floor: FLOPs (ms) | floor tok/s |"
    )
    print("|---" * 13 + "|")
    for r in rows:
        print(
            f"| {r['weights']} | {r['round']} | {r['concurrency']} | {r['requests']} ({r['cut']}) | {r['tok_s']:.1f} "
            f"| {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {1000 * r['itl_p50']:.1f} | {1000 * r['itl_p99']:.1f} "
            f"| {r['load']:.1f} | {r['mem_floor_ms']:.1f} | {r['flop_floor_ms']:.1f} | {r['floor_tok_s']:.0f} |"
        )
    if "llama-server" not in names:
        return
    # per concurrency: every round's tok/s and TTFT p50, their medians, and the median as a ratio of
    # llama-server's (tok/s above 1: faster; TTFT below 1: sooner)
    ours = [w for w in names if w != "llama-server"]

    def cell(w: str, c: int, key: str) -> tuple[float, str]:
        values = [r[key] for r in rows if r["weights"] == w and r["concurrency"] == c]
        fmt = "{:.1f}" if key == "tok_s" else "{:.3f}"
        return statistics.median(values), " / ".join(fmt.format(v) for v in values)

    columns = " | ".join(f"{w} tok/s | ratio | TTFT p50 (s) | ratio" for w in ours)
    print(f"\n| concurrency | llama-server tok/s | llama-server TTFT p50 (s) | {columns} |")
    print("|---" * (3 + 4 * len(ours)) + "|")
    for c in dict.fromkeys(r["concurrency"] for r in rows):
        (peer_tok, peer_tok_s), (peer_ttft, peer_ttft_s) = (
            cell("llama-server", c, "tok_s"),
            cell("llama-server", c, "ttft_p50"),
        )
        cells = []
        for w in ours:
            (tok, tok_s), (ttft, ttft_s) = cell(w, c, "tok_s"), cell(w, c, "ttft_p50")
            cells += [tok_s, f"{tok / peer_tok:.2f}x", ttft_s, f"{ttft / peer_ttft:.2f}x"]
        print(f"| {c} | {peer_tok_s} | {peer_ttft_s} | " + " | ".join(cells) + " |")
    print("(each cell: every round's figure in order; ratios of the medians)")


def plot_rows(rows: list[dict], path: Path, model: str = "", cpu: str = "") -> bool:
    """The table `rows` (as --json holds them) as a picture at `path` (.svg or .png, by its suffix): aggregate
    generated tok/s and TTFT p50 against concurrency, one line per server (its `weights` name), each point
    the median of its rounds; a level a server has no finite figure for (it failed, or received nothing)
    leaves a gap in that server's line. Titled with `model` and `cpu`. False, after one line saying so, when
    matplotlib (the `bench` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"picture {path} skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return False
    levels = sorted({r["concurrency"] for r in rows})
    names = list(dict.fromkeys(r["weights"] for r in rows))

    def median(name: str, c: int, key: str) -> float:
        values = [r.get(key) for r in rows if r["weights"] == name and r["concurrency"] == c]
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        return statistics.median(finite) if finite else math.nan  # NaN: matplotlib breaks the line there

    plt.rcParams["svg.fonttype"] = "none"  # text stays text in an SVG: searchable, and smaller
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    panels = (("tok_s", "aggregate generated tok/s"), ("ttft_p50", "TTFT p50 (s)"))
    for ax, (key, label) in zip(axes, panels):
        for name in names:
            ax.plot(levels, [median(name, c, key) for c in levels], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (streams)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(" on ".join(x for x in (model, cpu) if x) or "bench_serving")
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-url",
        nargs="+",
        help="running servers, each URL or NAME=URL (llama-server=URL: the others' tok/s as ratios of its) "
        "(default: start jaxserve here)",
    )
    parser.add_argument("--model", help="model id to request (default: each server's first)")
    parser.add_argument("--checkpoints", help="checkpoint folder for the server this script starts")
    parser.add_argument(
        "--quantize",
        nargs="+",
        choices=["gguf", "int4", "int8", "none"],
        default=["gguf"],
        help="weights of the jaxserve servers this script starts (default: gguf, the default card's own)",
    )
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary: also run it on the same GGUF")
    parser.add_argument("--llama-args", default="", help="more flags for llama-server (e.g. '--poll 0')")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="measure every level on every server this many times")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds per concurrency level at most")
    parser.add_argument(
        "--json", type=Path, help="also write every row here, and the table as a picture beside it (PATH.svg)"
    )
    parser.add_argument("--allow-remote", action="store_true")
    parser.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="each request's prompt differs from the last one's (PROMPT's words rotated), so no server's prompt "
        "cache skips the prefill (default: the same prompt every time)",
    )
    args = parser.parse_args()
    named = [u.split("=", 1) if "=" in u else (f"server {i + 1}", u) for i, u in enumerate(args.base_url or [])]
    urls = {name: u.rstrip("/").removesuffix("/v1") for name, u in named}
    if not args.allow_remote:
        for url in urls.values():
            check_loopback(url)
    cfg, machine = model_config(args), Machine.measure()  # measured before any server loads this machine
    print(f"floors: {machine}")
    slots = max(args.concurrency)
    starts = [(name, lambda u=u: (None, u)) for name, u in urls.items()]
    if not urls:
        starts += [
            (("float32" if q == "none" else q), lambda q=q: start_jaxserve(args, slots, q)) for q in args.quantize
        ]
    if args.llama_server:
        starts.append(("llama-server", lambda: start_llama_server(args, slots)))
    procs, servers = [], []
    try:
        for weights, start in starts:
            proc, url = start()
            procs.append(proc)
            model = args.model or httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            servers.append((weights, url, model))
            print(f"server {url} ({weights}), model {model}")
        print(
            f"{args.max_tokens} tokens per request, streaming, "
            f"{'distinct prompts' if args.distinct_prompts else 'the same prompt each time'}, "
            f"nice {os.nice(0)} (every server started here inherits it), load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        rows = measure_rounds(args, servers, cfg, machine)
    finally:
        for proc in procs:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    print_tables(rows, [w for w, _, _ in servers])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        model = args.model or servers[0][2]
        if plot_rows(rows, args.json.with_suffix(".svg"), model, cpu_model()):
            print(f"wrote {args.json} and {args.json.with_suffix('.svg')}")


if __name__ == "__main__":
    main()
