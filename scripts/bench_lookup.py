"""Would prompt-lookup (n-gram) speculative decoding pay for one stream? An estimate, nothing served.

    python scripts/bench_lookup.py [--model NAME] [--max-tokens 160] [--draft 2 4 8] [--ngram 3]
                                   [--repeats 7]

1. Generates greedily through the engine on realistic prompts whose answers repeat their input
   (summarising a passage, answering from it, rewriting code), then replays each answer as prompt lookup
   would have drafted it: before each step, the most recent earlier occurrence of the last n tokens
   (n = --ngram down to 1) in prompt + answer so far proposes the k tokens that followed it; a verify
   step keeps the longest prefix of the draft that greedy decoding produced, plus the one token it
   computes itself. Prints tokens per verify step for each draft length k.
2. Times the model's forward pass over T = 1 and T = k + 1 tokens of one sequence (hidden states through
   the page pool, logits for every token: what a verify step computes), interleaved, medians. Both with
   the int8 weights widened to float32 (formulation f32), so that the answers do not depend on a
   formulation measured at start-up.
Speed-up estimate = (tokens per verify step) x (1-token time / (k+1)-token time), before the host work
a verify step adds (drafting, rewinding the rejected positions).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from jaxserve.checkpoint import DEFAULT_MODEL, load_model
from jaxserve.device.build import build_engine
from jaxserve.engine.bridge import complete
from jaxserve.engine.types import EngineRequest, SamplingParams
from jaxserve.model import KVCache, Transformer
from jaxserve.sharding import make_mesh

PASSAGE = (
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
    "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
    "from outer space and is the world's biggest single structure made by living organisms. This reef "
    "structure is composed of and built by billions of tiny organisms, known as coral polyps. It supports a "
    "wide diversity of life and was selected as a World Heritage Site in 1981. The reef is under threat from "
    "climate change, pollution, crown-of-thorns starfish and fishing. Coral bleaching caused by rising ocean "
    "temperatures has damaged large parts of the reef since 2016."
)
CODE = """def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total += (value - m) ** 2
    return total / len(values)
"""
PROMPTS = {
    "summary": f"{PASSAGE}\n\nSummarize the text above in a few sentences.",
    "qa": f"{PASSAGE}\n\nUsing the text above, what threatens the reef, and when was it made a World Heritage Site?",
    "code": f"{CODE}\nRewrite these two functions with type hints and docstrings.",
}


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def replay(prompt: list[int], answer: list[int], k: int, ngram: int) -> tuple[int, int]:
    """(verify steps, tokens) prompt lookup with draft length k would take to produce `answer`."""
    context, done, steps = list(prompt), 0, 0
    while done < len(answer):
        draft: list[int] = []
        for n in range(min(ngram, len(context) - 1), 0, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):  # the most recent earlier occurrence
                if context[start : start + n] == tail:
                    draft = context[start + n : start + n + k]
                    break
            if draft:
                break
        accepted = 0
        while accepted < len(draft) and done + accepted < len(answer) and draft[accepted] == answer[done + accepted]:
            accepted += 1
        take = min(accepted + 1, len(answer) - done)
        context += answer[done : done + take]
        done += take
        steps += 1
    return steps, len(answer)


def forward_times(model, widths: list[int], repeats: int, position: int = 300) -> dict[int, float]:
    """Median ms of one sequence's forward over T tokens (hidden + logits of all T), for each T."""
    page = 128
    cache = KVCache.zeros(model.cfg, 2048 // page, page)
    table = jnp.arange(2048 // page, dtype=jnp.int32)[None]
    window = page * (-(-(position + max(widths)) // page))

    @functools.partial(jax.jit, donate_argnums=1)  # the pool updated in place, as in the engine's steps
    def forward(params, cache, tokens, positions):
        m = Transformer(model.cfg)
        return m.apply(params, tokens, positions, cache, table, window)

    calls = {}
    for T in widths:
        tokens = jnp.full((1, T), 42, jnp.int32)
        positions = (position + jnp.arange(T, dtype=jnp.int32))[None]
        calls[T] = (tokens, positions)
        logits, cache = forward(model.params, cache, tokens, positions)
    runs: dict[int, list[float]] = {T: [] for T in widths}
    for _ in range(repeats):
        for T, (tokens, positions) in calls.items():
            t0 = time.perf_counter()
            logits, cache = jax.block_until_ready(forward(model.params, cache, tokens, positions))
            runs[T].append(1000 * (time.perf_counter() - t0))
    return {T: statistics.median(ms) for T, ms in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--draft", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    model = load_model(args.model, args.checkpoints, make_mesh(1, None), progress=False, quantize="int8")
    tok = model.tokenizer
    engine = build_engine(model, slots=1, max_context=1024, warmup=False, formulation="f32")  # as timed below
    per_k: dict[int, list[tuple[int, int]]] = {k: [] for k in args.draft}
    for name, text in PROMPTS.items():
        prompt = tok.encode(chat(text))
        req = EngineRequest(name, tuple(prompt), max_tokens=args.max_tokens, sampling=SamplingParams(temperature=0.0))
        deltas, _ = complete(engine, req, timeout=600)
        answer = [t.token_id for d in deltas for t in d.tokens]
        line = [f"{name}: prompt {len(prompt)} tokens, answer {len(answer)}"]
        for k in args.draft:
            steps, n = replay(prompt, answer, k, args.ngram)
            per_k[k].append((steps, n))
            line.append(f"k={k}: {n / steps:.2f} tokens/step")
        print("; ".join(line), flush=True)
    engine.shutdown()
    times = forward_times(model, [1] + [k + 1 for k in args.draft], args.repeats)
    print("forward of one sequence, ms (median): " + ", ".join(f"T={T}: {ms:.1f}" for T, ms in times.items()))
    print("| draft k | tokens per verify step (all prompts) | (k+1)-token / 1-token time | estimated speed-up |")
    print("|---|---|---|---|")
    for k in args.draft:
        steps, n = (sum(x) for x in zip(*per_k[k]))
        ratio = times[k + 1] / times[1]
        print(f"| {k} | {n / steps:.2f} | {ratio:.2f} | {n / steps / ratio:.2f}x |")


if __name__ == "__main__":
    main()
