"""LoRA serving throughput: streams spread over the base and several adapters against base-only streams, in
one run; then the per-row update alone, as the masked product jaxserve uses against the alternatives.

    python scripts/bench_lora.py [--model NAME] [--quantize Q] [--streams 32] [--adapters 4] [--rank 16]
                                 [--prompt-tokens 32] [--gen-tokens 64] [--repeats 3]

Engine: one engine of --streams slots with a stack of --adapters adapters of rank --rank on all seven
projections (seeded random, written in PEFT's layout by the tests' writer), and one engine without
adapters; a first, untimed round compiles the shapes these requests reach. Each round submits --streams
requests at once (EOS ignored) three ways, interleaved so that a shared machine's noise falls on each
alike: base-only on the adapter-less engine, base-only on the LoRA engine, and spread round-robin over
the base and every adapter on the LoRA engine. Prints the median generated tok/s of each and the ratios.

Update alone: one layer's LoRA update of every projection for --streams rows of one token, with
--adapters resident: the masked product over the stack (jaxserve.model.lora.delta), the same step when no
row has an adapter (skipped, as served), a grouped product (rows sorted by adapter, jax.lax.ragged_dot),
and a per-row gather of each row's adapter weights.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.checkpoint import DEFAULT_MODEL, QUANTIZE, load_model
from jaxserve.device.build import build_engine
from jaxserve.engine.types import EngineRequest, SamplingParams, Usage
from jaxserve.engine_args import checkpoint_root
from jaxserve.model import lora
from jaxserve.sharding import make_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lora_files import write_adapter


def throughput(engine, prompts, adapters, gen_tokens: int) -> tuple[float, float]:
    """Generated tokens per second of the requests (prompt i under adapter adapters[i]) submitted at once, and
    per CPU second of this process (all its threads): on a shared machine the second is the steadier measure of
    the work a step takes, as time spent waiting for the CPU does not count."""
    done, finished = threading.Event(), set()
    reqs = [
        EngineRequest(f"r{i}", p, gen_tokens, SamplingParams(temperature=0.0), ignore_eos=True, adapter=a)
        for i, (p, a) in enumerate(zip(prompts, adapters))
    ]

    def emit(i, item):
        if isinstance(item, Usage):
            finished.add(i)
            if len(finished) == len(reqs):
                done.set()
        elif isinstance(item, Exception):
            raise item

    t0, cpu0 = time.perf_counter(), time.process_time()
    engine.submit(reqs, emit)
    done.wait()
    tokens = len(reqs) * gen_tokens
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - cpu0)


def bench_engines(model, args, directory: Path) -> None:
    names = [f"lora{i}" for i in range(args.adapters)]
    loras = {n: str(write_adapter(directory / n, model.cfg, args.rank, seed=i, std=0.02)) for i, n in enumerate(names)}
    words = "the quick brown fox jumps over the lazy dog and runs far away into the woods".split()
    tok = model.tokenizer
    prompts = [
        tuple(
            tok.encode(" ".join(words[(i + j) % len(words)] for j in range(args.prompt_tokens)))[: args.prompt_tokens]
        )
        for i in range(args.streams)
    ]
    context = args.prompt_tokens + args.gen_tokens + 1
    # no warm-up of every shape: the untimed first round compiles the few these requests reach
    common = dict(slots=args.streams, max_context=context, prefix_caching=False, warmup=False)
    plain = build_engine(model, **common)
    with_lora = build_engine(model, **common, loras=loras, max_lora_rank=args.rank)
    base_only = [None] * args.streams
    spread = [([None, *names])[i % (len(names) + 1)] for i in range(args.streams)]
    runs: dict[str, list[tuple[float, float]]] = {
        "base, no LoRA stack": [],
        "base, LoRA engine": [],
        "mixed, LoRA engine": [],
    }
    try:
        for _ in range(args.repeats + 1):
            runs["base, no LoRA stack"].append(throughput(plain, prompts, base_only, args.gen_tokens))
            runs["base, LoRA engine"].append(throughput(with_lora, prompts, base_only, args.gen_tokens))
            runs["mixed, LoRA engine"].append(throughput(with_lora, prompts, spread, args.gen_tokens))
    finally:
        plain.shutdown()
        with_lora.shutdown()
    runs = {k: v[1:] for k, v in runs.items()}  # the first round compiled
    print(f"\n{args.streams} streams, {args.prompt_tokens} prompt + {args.gen_tokens} generated tokens each; ", end="")
    print(f"{args.adapters} adapters of rank {args.rank} on all seven projections; medians of {args.repeats}")
    for i, unit in enumerate(("tok/s", "tok per CPU s")):
        med = {k: statistics.median(r[i] for r in v) for k, v in runs.items()}
        for k, v in med.items():
            print(f"  {k:22s} {v:8.1f} {unit}   (runs: {', '.join(f'{r[i]:.1f}' for r in runs[k])})")
        print(f"  mixed / base-only on the LoRA engine: {med['mixed, LoRA engine'] / med['base, LoRA engine']:.3f}")
        print(f"  mixed / base-only without adapters:   {med['mixed, LoRA engine'] / med['base, no LoRA stack']:.3f}")


BASE = {  # the base kernels' einsums (jaxserve.model.transformer.Block)
    "q": "btd,dnh->btnh",
    "k": "btd,dkh->btkh",
    "v": "btd,dkh->btkh",
    "o": "btnh,nhd->btd",
    "gate_up": "btd,dcf->btcf",
    "down": "btf,fd->btd",
}


def base_shapes(cfg) -> dict:
    D, N, K, H, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    return {"q": (D, N, H), "k": (D, K, H), "v": (D, K, H), "o": (N, H, D), "gate_up": (D, 2, F), "down": (F, D)}


def bench_update(cfg, args) -> None:
    """One layer's update of every projection, three ways, in float32 at --streams rows of one token."""
    B, M, R = args.streams, args.adapters, args.rank
    rng = np.random.default_rng(0)
    shapes = lora.stack_shapes(cfg, M, R)
    layer = {
        t: tuple(jnp.asarray(rng.standard_normal(s.shape[1:]), jnp.float32) for s in pair) for t, pair in shapes.items()
    }
    layer_stack = lambda layer: jax.tree.map(lambda w: w[None], layer)  # lora.route reads M off a stack
    index = jnp.asarray(rng.integers(0, M + 1, B), jnp.int32)
    inputs = lora.TARGETS
    size = dict(d=cfg.dim, n=cfg.n_heads, k=cfg.n_kv_heads, h=cfg.head_dim, f=cfg.mlp_dim)
    xs = {t: jnp.asarray(rng.standard_normal((B, 1, *(size[c] for c in inputs[t][0]))), jnp.float32) for t in inputs}

    @jax.jit
    def masked(xs, layer, index):
        rows = lora.route(layer_stack(layer), index)
        return {t: lora.delta(t, xs[t], layer[t], rows.mask) for t in xs}

    @jax.jit
    def skipped(xs, layer, index):  # as served: no row has an adapter, the update is skipped
        rows = lora.route(layer_stack(layer), index)
        return {t: lora.apply(t, jnp.zeros(want[t].shape), xs[t], layer[t], rows) for t in xs}

    # the alternatives read each entry's weights with the stack's M axis first, the layout they want
    by_entry = {
        t: tuple(jnp.moveaxis(w, letters.index("m"), 0) for w, letters in zip(layer[t], inputs[t][1:])) for t in layer
    }
    letters = {t: tuple(c.replace("m", "") for c in v) for t, v in inputs.items()}

    @jax.jit
    def gathered(xs, layer, index):  # each row's own copy of its adapter (index 0: a zero entry in front)
        out = {}
        for t, (x_in, a_letters, b_letters) in letters.items():
            a, b = (jnp.concatenate([jnp.zeros_like(w[:1]), w])[index] for w in layer[t])
            u_letters = "bt" + "".join(c for c in a_letters if c not in x_in)
            u = jnp.einsum(f"bt{x_in},b{a_letters}->{u_letters}", xs[t], a)
            out[t] = jnp.einsum(f"{u_letters},b{b_letters}->bt{b_letters.replace('r', '')}", u, b)
        return out

    @jax.jit
    def grouped(xs, layer, index):  # rows sorted by adapter, one ragged product per group (base rows: a zero group)
        order = jnp.argsort(index)
        sizes = jnp.bincount(index, length=M + 1).astype(jnp.int32)
        out = {}
        for t, (_, a_letters, _) in letters.items():
            a, b = layer[t]
            x = xs[t].reshape(B, -1)[order]
            a2 = jnp.concatenate([jnp.zeros_like(a[:1]), a]).reshape(M + 1, x.shape[1], -1)  # [G, in, (c)r]
            u = jax.lax.ragged_dot(x, a2, sizes)  # [B, (c)r]
            if "c" in a_letters:  # gate_up: each half's r columns meet its own B
                bz = jnp.concatenate([jnp.zeros_like(b[:1]), b])  # [G, 2, r, F]
                u2 = u.reshape(B, 2, R)
                y = jnp.stack([jax.lax.ragged_dot(u2[:, c], bz[:, c], sizes) for c in range(2)], 1)
            else:
                bz = jnp.concatenate([jnp.zeros_like(b[:1]), b]).reshape(M + 1, R, -1)
                y = jax.lax.ragged_dot(u, bz, sizes)
            out[t] = jnp.zeros_like(y).at[order].set(y)
        return out

    weights = {t: jnp.asarray(rng.standard_normal(s) * 0.02, jnp.float32) for t, s in base_shapes(cfg).items()}

    @jax.jit
    def base(xs, layer, index):  # for scale: the base's own matmuls of those projections at those rows
        return {t: jnp.einsum(spec, xs[t], weights[t]) for t, spec in BASE.items()}

    want = masked(xs, layer, index)
    runs = (
        ("masked (served)", masked, layer, index),
        ("masked, no adapter row", skipped, layer, jnp.zeros_like(index)),
        ("grouped (ragged_dot)", grouped, by_entry, index),
        ("per-row gather", gathered, by_entry, index),
        ("base matmuls, for scale", base, layer, index),
    )
    for name, fn, stack, rows in runs:
        got = fn(xs, stack, rows)
        err = (
            0.0
            if fn in (base, skipped)
            else max(float(jnp.abs(got[t].reshape(want[t].shape) - want[t]).max()) for t in want)
        )
        times = []
        for _ in range(args.repeats * 20):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(xs, stack, rows))
            times.append(time.perf_counter() - t0)
        print(f"  {name:22s} {statistics.median(times) * 1e6:9.1f} us per layer   (max |diff| vs masked {err:.1e})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--checkpoints")
    p.add_argument("--quantize", choices=QUANTIZE, help="the base weights (default: float, as converted)")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--update-only", action="store_true", help="only the per-layer update comparison")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = checkpoint_root(args.checkpoints)
    model = load_model(args.model, root, make_mesh(1, 1), progress=False, quantize=args.quantize)
    print(f"{model.name}: {model.cfg.num_params() / 1e6:.0f}M params, {model.cfg.quant or model.cfg.dtype} weights")
    print(
        f"\none layer's update of seven projections: {args.streams} rows, {args.adapters} adapters of rank {args.rank}"
    )
    bench_update(model.cfg, args)
    if not args.update_only:
        with tempfile.TemporaryDirectory() as directory:
            bench_engines(model, args, Path(directory))


if __name__ == "__main__":
    main()
