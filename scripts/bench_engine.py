"""Offline engine throughput on the default model, float32 and int8 weights side by side, with the two
floors beside each figure.

    python scripts/bench_engine.py [--model NAME] [--weights float32 int8] [--concurrency 1 8 32 64]
                                   [--prompt-tokens 32] [--gen-tokens 128] [--repeats 3]
                                   [--formulation auto f32 bf16 kernel] [--kv-cache-dtype bfloat16]

int8 runs once per --formulation (the int8 matmuls' arithmetic, see jaxserve.device.formulation; "auto" is
what `jaxserve serve` would choose here), the formulations' runs interleaved so that a shared machine's
noise falls on each alike. For each weights and concurrency C (each run --repeats times; medians reported):
C requests of 32 prompt
tokens and 128 generated tokens (EOS ignored) submitted at once to an engine with C slots. Prints generated
tok/s, time to first token, median step latency and peak RSS, then the floors per step: (weight + KV bytes
read) / measured memory bandwidth, and FLOPs / measured matmul throughput. Then prefill: a burst of
--prefill-burst prompts with one generated token each, as prompt tok/s. --kv-cache-dtype: the KV pool's
dtype, as `jaxserve serve` takes it (every run; the KV floor counts its bytes).
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import statistics
import threading
import time

import jax

from jaxserve.checkpoint import DEFAULT_MODEL, load_model
from jaxserve.device.build import DEFAULT_CONTEXT, build_engine, enable_compilation_cache
from jaxserve.device.formulation import FORMULATIONS
from jaxserve.device.roofline import Machine, floors
from jaxserve.engine.types import EngineRequest, SamplingParams, Usage
from jaxserve.engine_args import compile_cache_dir
from jaxserve.model.config import KV_DTYPES
from jaxserve.sharding import make_mesh


def run(model, concurrency: int, prompt_tokens: int, gen_tokens: int, max_context: int, formulation, cache, kv="auto"):
    tok = model.tokenizer
    scheduler = build_engine(
        model,
        slots=concurrency,
        max_context=max_context,
        formulation=formulation,
        formulation_cache=cache,
        kv_cache_dtype=kv,
    )
    chosen = scheduler.core.model.formulation.describe(model.cfg)
    words = "the quick brown fox jumps over the lazy dog and runs far away into the woods".split()
    prompts = []
    for i in range(concurrency):
        ids = tok.encode(" ".join(words[(i + j) % len(words)] for j in range(prompt_tokens)))[:prompt_tokens]
        prompts.append(tuple(ids))
    first_token, finished = {}, {}
    all_done = threading.Event()
    t0 = time.perf_counter()

    def emit(i, item):
        now = time.perf_counter() - t0
        if i not in first_token and getattr(item, "tokens", None):
            first_token[i] = now
        if isinstance(item, Usage):
            finished[i] = now
            if len(finished) == concurrency:
                all_done.set()

    scheduler.submit(
        [
            EngineRequest(
                f"b{i}", prompts[i], max_tokens=gen_tokens, ignore_eos=True, sampling=SamplingParams(temperature=0.0)
            )
            for i in range(concurrency)
        ],
        emit,
    )
    all_done.wait()
    wall = time.perf_counter() - t0
    scheduler.shutdown()
    del scheduler
    gc.collect()  # free this run's KV cache before the next engine allocates its own
    # per request, decode time per token after its first: the step latency that request saw
    per_token = [(finished[i] - first_token[i]) / max(1, gen_tokens - 1) for i in range(concurrency)]
    return {
        "tok_s": concurrency * gen_tokens / wall,
        "ttft_med": statistics.median(first_token.values()),
        "step_ms": 1000 * statistics.median(per_token),
        "wall": wall,
        "prefill_tok_s": concurrency * prompt_tokens / max(first_token.values()),
        "formulation": chosen,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--weights", nargs="+", choices=["float32", "int8"], default=["float32", "int8"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--prefill-burst", type=int, default=64, help="prompts in the prefill measurement (0: skip)")
    parser.add_argument("--max-context", type=int, default=DEFAULT_CONTEXT, help="tokens per slot")
    parser.add_argument("--repeats", type=int, default=3, help="runs per concurrency; medians are reported")
    parser.add_argument("--compile-cache", help="as for `jaxserve generate`")
    parser.add_argument("--formulation", nargs="+", choices=FORMULATIONS, default=["auto"], help="of the int8 matmuls")
    parser.add_argument("--kv-cache-dtype", choices=["auto", *KV_DTYPES], default="auto", help="the KV pool's dtype")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if (cache := compile_cache_dir(args.compile_cache)) is not None:
        enable_compilation_cache(cache)
    machine = Machine.measure()
    print(f"model {args.model}, devices {jax.devices()}, {machine}, KV pool {args.kv_cache_dtype}")
    rows, prefills = [], []
    kv = args.kv_cache_dtype
    for weights in args.weights:
        model = load_model(
            args.model,
            args.checkpoints,
            make_mesh(1, None),
            progress=False,
            quantize="int8" if weights == "int8" else None,
        )
        variants = args.formulation if weights == "int8" else ["auto"]
        for c in args.concurrency:
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for _ in range(args.repeats):
                for v in variants:
                    runs[v].append(run(model, c, args.prompt_tokens, args.gen_tokens, args.max_context, v, cache, kv))
            for v in variants:
                r = {key: statistics.median(run[key] for run in runs[v]) for key in runs[v][0] if key != "formulation"}
                r["tok_s_all"] = " / ".join(f"{run['tok_s']:.0f}" for run in runs[v])
                mem_floor, flop_floor = floors(
                    model.cfg.with_kv_dtype(kv), c, args.prompt_tokens + args.gen_tokens, machine
                )
                label = weights if weights != "int8" else f"int8 {v}: {runs[v][0]['formulation']}"
                r.update(
                    weights=label,
                    conc=c,
                    peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                    mem_floor_ms=1000 * mem_floor,
                    flop_floor_ms=1000 * flop_floor,
                    floor_tok_s=c / max(mem_floor, flop_floor),
                )
                rows.append(r)
                print(
                    f"{label} C={c}: {r['tok_s']:.1f} tok/s (runs: {r['tok_s_all']}), "
                    f"TTFT median {r['ttft_med']:.3f} s, step {r['step_ms']:.1f} ms",
                    flush=True,
                )
        if args.prefill_burst:
            burst = [
                run(model, args.prefill_burst, args.prompt_tokens, 1, args.max_context, variants[0], cache, kv)
                for _ in range(args.repeats)
            ]
            prefills.append((weights, statistics.median(run["prefill_tok_s"] for run in burst)))
            print(f"{weights} prefill: {prefills[-1][1]:.0f} prompt tok/s", flush=True)
        del model
        gc.collect()
    print(
        "\n| weights | concurrency | tok/s (median) | runs | TTFT median (s) | step (ms, median) | floor: bytes (ms) "
        "| floor: FLOPs (ms) | floor tok/s | process peak RSS so far (GB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['weights']} | {r['conc']} | {r['tok_s']:.1f} | {r['tok_s_all']} | {r['ttft_med']:.3f} "
            f"| {r['step_ms']:.1f} | {r['mem_floor_ms']:.1f} | {r['flop_floor_ms']:.1f} | {r['floor_tok_s']:.0f} "
            f"| {r['peak_gb']:.2f} |"
        )
    for weights, tok_s in prefills:
        print(
            f"\nprefill, {weights}: {args.prefill_burst} prompts x {args.prompt_tokens} tokens at once: "
            f"{tok_s:.0f} prompt tok/s (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
