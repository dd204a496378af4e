"""A shared-prefix workload over HTTP: one long document, then many different questions about it, each
a completion request of document + question, with and without prefix caching, side by side in one run.

    python scripts/bench_prefix.py [--questions 32] [--doc-tokens 1500] [--concurrency 8] [--max-tokens 16]
                                   [--quantize int8] [--model NAME] [--checkpoints DIR]

Starts `jaxserve serve` twice on a free loopback port (the second time with --no-prefix-caching), sends the
same greedy requests at the same concurrency, and prints each run's total time, its prefix-cache hits (from
/metrics) and whether the two runs' outputs are identical.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from bench_serving import start_jaxserve
from prometheus_client.parser import text_string_to_metric_families

PARAGRAPH = (
    "Section {i}. The river town kept its records in a ledger that passed from one clerk to the next. In the "
    "year of the great flood the clerk wrote that the water rose above the mill wheel, that the bridge held, "
    "and that the baker on the east bank gave bread to everyone who crossed. "
)
QUESTIONS = [
    "What did the clerk write about the bridge?",
    "Who gave bread to the people crossing?",
    "Where did the water rise?",
    "How were the records kept?",
    "What happened in the year of the great flood?",
    "Which bank was the baker on?",
    "Who passed the ledger on?",
    "What held during the flood?",
]


def document(tokens: int) -> str:
    """About `tokens` tokens of text (roughly 45 per paragraph)."""
    return "".join(PARAGRAPH.format(i=i) for i in range(max(1, tokens // 45)))


async def run(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[float, list[str], int]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]

        async def one(prompt: str) -> dict:
            async with limit:
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                r = await http.post("/v1/completions", json=body)
                r.raise_for_status()
                return r.json()

        start = time.perf_counter()
        out = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
    return wall, [o["choices"][0]["text"] for o in out], out[0]["usage"]["prompt_tokens"]


def prefix_hits(url: str) -> tuple[float, float]:
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
        for s in family.samples
    }
    return samples.get("vllm:prefix_cache_queries_total", 0.0), samples.get("vllm:prefix_cache_hits_total", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--quantize", default="int8")
    parser.add_argument("--model")
    parser.add_argument("--checkpoints")
    args = parser.parse_args()
    doc = document(args.doc_tokens)
    prompts = [f"{doc}\nQuestion {i + 1}: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:" for i in range(args.questions)]
    results = {}
    for label, flags in (("prefix caching", ()), ("no prefix caching", ("--no-prefix-caching",))):
        proc, url = start_jaxserve(args, args.concurrency, args.quantize, *flags)
        try:
            wall, texts, prompt_tokens = asyncio.run(run(url, prompts, args.concurrency, args.max_tokens))
            results[label] = (wall, texts, prompt_tokens, prefix_hits(url))
        finally:
            proc.terminate()
            proc.wait(60)
    print(
        f"\n{args.questions} questions after one document of ~{results['prefix caching'][2]} prompt tokens, "
        f"max_tokens {args.max_tokens}, greedy, concurrency {args.concurrency}, weights {args.quantize}"
    )
    print(f"{'':20} {'total s':>9} {'tok/s out':>10} {'prefix hits':>14}")
    for label, (wall, _, _, (queried, hit)) in results.items():
        rate = args.questions * args.max_tokens / wall
        print(f"{label:20} {wall:9.2f} {rate:10.1f} {hit / max(queried, 1):13.0%}")
    on, off = results["prefix caching"][0], results["no prefix caching"][0]
    same = results["prefix caching"][1] == results["no prefix caching"][1]
    print(f"with / without: {on / off:.2f}x the time; outputs identical: {same}")


if __name__ == "__main__":
    main()
