"""What grammar-constrained decoding costs: generated tok/s of C concurrent schema-constrained requests
against C unconstrained ones, on one engine, offline.

    python scripts/bench_structured.py [--model NAME] [--concurrency 8] [--gen-tokens 128] [--repeats 3]

Each round submits C chat requests at once (temperature 1, different seeds) and measures generated tokens /
wall time until the last finishes: first C unconstrained (EOS ignored, so each makes --gen-tokens), then C
constrained by a JSON schema long enough to keep them decoding (an array of 24 short strings), then a mixed
round (half constrained). Medians of --repeats rounds, and the median of each repeat's own ratio to its
unconstrained round. Constrained outputs that end by themselves (not cut by --gen-tokens) must all parse:
the count is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time

from jaxserve.chat_template import encode_prompt, render
from jaxserve.checkpoint import DEFAULT_MODEL, load_model
from jaxserve.device.build import build_engine, enable_compilation_cache
from jaxserve.engine.bridge import complete
from jaxserve.engine.grammar import compile_response_format
from jaxserve.engine.types import EngineRequest, SamplingParams
from jaxserve.engine_args import compile_cache_dir
from jaxserve.sharding import make_mesh

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 24,
            "maxItems": 24,
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}


def round_(scheduler, reqs) -> tuple[float, list]:
    results = {}

    def run(r):
        results[r.request_id] = complete(scheduler, r, timeout=1200)

    threads = [threading.Thread(target=run, args=(r,)) for r in reqs]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    seconds = time.perf_counter() - t0
    tokens = sum(usage.completion_tokens for _, usage in results.values())
    return tokens / seconds, [results[r.request_id] for r in reqs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--quantize", default="int8")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache = compile_cache_dir(None)
    if cache:
        enable_compilation_cache(cache)
    model = load_model(args.model, args.checkpoints, make_mesh(1, 1), progress=False, quantize=args.quantize)
    tok = model.tokenizer
    scheduler = build_engine(model, slots=args.concurrency, max_context=512)
    prompt = tuple(encode_prompt(tok, render(tok, [{"role": "user", "content": "List 24 fruits as JSON."}])))
    grammar = compile_response_format({"type": "json_schema", "json_schema": {"name": "l", "schema": SCHEMA}}, tok)
    C, N = args.concurrency, args.gen_tokens

    def reqs(tag: str, constrained: int, r: int) -> list[EngineRequest]:
        return [
            EngineRequest(
                f"{tag}{r}-{i}",
                prompt,
                max_tokens=N,
                sampling=SamplingParams(temperature=1.0),
                seed=1000 * r + i,
                ignore_eos=i >= constrained,
                grammar=grammar if i < constrained else None,
            )
            for i in range(C)
        ]

    try:
        round_(scheduler, reqs("warm", C // 2, 0))  # first use of every path
        rates: dict[str, list[float]] = {"unconstrained": [], "constrained": [], "mixed": []}
        valid = ended = total = 0
        for r in range(args.repeats):
            for name, k in (("unconstrained", 0), ("constrained", C), ("mixed", C // 2)):
                rate, results = round_(scheduler, reqs(name, k, r + 1))
                rates[name].append(rate)
                for deltas, _ in results[:k]:
                    total += 1
                    if deltas[-1].finish_reason != "stop":
                        continue  # cut by max_tokens: unfinished JSON
                    ended += 1
                    try:
                        json.loads("".join(d.text for d in deltas))
                        valid += 1
                    except ValueError:
                        pass
        base = statistics.median(rates["unconstrained"])
        print(f"{args.model} ({args.quantize}), {C} concurrent requests, up to {N} tokens each, {args.repeats} rounds")
        for name, values in rates.items():
            med = statistics.median(values)
            # each repeat runs the three kinds back to back: a ratio within one repeat shrugs off slow drifts
            # in the machine's load that the medians of separate rounds do not
            paired = statistics.median(v / f for v, f in zip(values, rates["unconstrained"]))
            print(
                f"  {name:14s} {med:7.1f} generated tok/s  ({med / base:.2f}x, within repeats {paired:.2f}x)  "
                f"rounds: {[round(v, 1) for v in values]}"
            )
        print(f"  constrained outputs: {ended}/{total} ended by themselves, {valid}/{ended} of those parse as JSON")
    finally:
        scheduler.shutdown()


if __name__ == "__main__":
    main()
