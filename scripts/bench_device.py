"""Decode throughput and time to first token on whatever device jax finds: a GPU, a TPU, or the CPU as a
smoke test. Self-contained: random weights with the shapes of SmolLM2-135M, Llama 3.2 1B and Llama 3.1 8B
(no checkpoint, tokenizer, HTTP stack, GGUF reader or grammar library is imported: only the model and the
engine's jitted steps), so it runs on a bare image with jax and this repository.

    python scripts/bench_device.py                 # every model that fits, 1/8/64/256 streams, bfloat16
    python scripts/bench_device.py --quick         # CPU smoke run: SmolLM2's shape, 1 and 8 streams
    python scripts/bench_device.py [--models smollm2 llama-1b llama-8b] [--streams 1 8 64 256]
        [--prompt 128] [--steps 32] [--dtype bfloat16] [--attention auto plain] [--out bench_device]

For each model (skipped where its weights do not fit in the device's memory; streams whose KV does not fit
are dropped) and each number of streams n, through the same jitted steps the server runs (the attention
`jaxserve serve` would choose here: a Pallas kernel on a TPU or a GPU, jaxserve's C++ kernel on a CPU;
`--attention auto plain` measures XLA's beside it):

- TTFT: n prompts of --prompt tokens arrive at once and are prefilled in groups of up to 8 rows, each
  row's first token sampled (`insert`) right after its group; median and last over the n requests.
- decode: n streams take --steps decode steps (forward + sample), dispatched back to back: tok/s and
  ms per step.
- MBU: the bytes a step must read (weights once, and each stream's K/V at its positions) per second, over
  the chip's published memory bandwidth; MFU: the step's matmul and attention FLOPs per second over its
  published bfloat16 peak (the prefill's for TTFT). Chips missing from PEAKS (a CPU) get none.

Each shape is run once before it is timed (compiles are reported apart). Results go to --out.json and
--out.md (a Markdown table, also printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.device import steps
from jaxserve.device.runner import PAGE_SIZE
from jaxserve.device.state import DecodeState, SamplingState
from jaxserve.engine.types import SamplingParams
from jaxserve.model import KVCache, ModelConfig, abstract_params, attention_kernels
from jaxserve.model.quant import Formulation
from jaxserve.sharding import make_mesh, replicated

MODELS = {
    "smollm2": ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, mlp_dim=1536,
        rope_theta=100000.0,
    ),
    "llama-1b": ModelConfig(  # Llama 3.2 1B
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, mlp_dim=8192,
        rope_theta=500000.0,
    ),
    "llama-8b": ModelConfig(  # Llama 3.1 8B
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, mlp_dim=14336,
        rope_theta=500000.0, tie_embeddings=False,
    ),
}  # fmt: skip

# published peaks: (substring of jax's device_kind, memory bytes/s, dense bfloat16 FLOP/s)
PEAKS = (
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),  # SXM (device_kind "NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100", 1.555e12, 312e12),
    ("L4", 0.3e12, 121e12),
    ("TPU v6 lite", 1.64e12, 918e12),  # v6e
    ("TPU v5 lite", 0.819e12, 197e12),  # v5e
    ("TPU v5", 2.765e12, 459e12),  # v5p
    ("TPU v4", 1.2e12, 275e12),
)
PREFILL_ROWS = 8  # prompts prefilled together
MEMORY_SHARE = 0.85  # of the device's memory that weights and KV may take


def random_params(cfg: ModelConfig):
    """Weights of the model's shapes and dtype made on the device in one jitted call: a hash of each index,
    spread over +-0.02, different in every array (jax's random draws of 8B numbers take minutes on a CPU);
    norm scales 1."""
    shapes, _ = abstract_params(cfg)

    def fill(path, s):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(s.shape, s.dtype)
        salt = np.uint32(zlib.crc32(jax.tree_util.keystr(path).encode()))
        i = jax.lax.iota(jnp.uint32, int(np.prod(s.shape))) * np.uint32(2654435761) + salt
        return (((i >> 8).astype(jnp.float32) / (1 << 24) - 0.5) * 0.04).astype(s.dtype).reshape(s.shape)

    return jax.jit(lambda: jax.tree_util.tree_map_with_path(fill, shapes))()


def peak(kind: str) -> tuple[float, float] | None:
    return next(((bw, fl) for name, bw, fl in PEAKS if name in kind), None)


def device_memory() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # a CPU: the host's memory


def weight_bytes(cfg: ModelConfig) -> int:
    """Bytes a decode step reads of the weights: all of them, but only a few rows of an untied embedding."""
    unread = cfg.vocab_size * cfg.dim if not cfg.tie_embeddings else 0
    return (cfg.num_params() - unread) * jnp.dtype(cfg.dtype).itemsize


def flops(cfg: ModelConfig, tokens: int, attended: float) -> float:
    """Matmul and attention FLOPs of `tokens` tokens each attending over `attended` positions on average."""
    matmul = cfg.num_params() - (cfg.vocab_size * cfg.dim if not cfg.tie_embeddings else 0)
    return 2 * tokens * matmul + 4 * cfg.n_layers * tokens * attended * cfg.n_heads * cfg.head_dim


class Bench:
    """One model's engine steps over `slots` streams of up to `context` positions, on one device."""

    def __init__(self, cfg: ModelConfig, slots: int, context: int, attention: str):
        mesh = make_mesh(1, 1)
        if attention == "auto":  # as `jaxserve serve` would choose here
            self.cfg = attention_kernels.choose(cfg, mesh, PAGE_SIZE)
        else:
            self.cfg = dataclasses.replace(cfg, attention=attention)
        self.pages_per_seq = -(-context // PAGE_SIZE)
        self.window = self.pages_per_seq * PAGE_SIZE
        pages = slots * self.pages_per_seq
        sharding = DecodeState.shardings(self.cfg, mesh, slots, pages, PAGE_SIZE)
        # float weights (no int8 formulation); no EOS: every stream runs on
        self.spec = steps.StepSpec(self.cfg, Formulation(), (), sharding, replicated(mesh))
        self.params = random_params(self.cfg)
        self.state = jax.jit(lambda: DecodeState.initial(self.cfg, slots, pages, PAGE_SIZE), out_shardings=sharding)()
        self.table = np.arange(pages, dtype=np.int32).reshape(slots, self.pages_per_seq)
        self.row = SamplingState.host_row(SamplingParams(temperature=1.0), cfg.vocab_size)

    def first_tokens(self, n: int, prompt: int) -> list[float]:
        """n prompts prefilled in groups, each request's first token sampled: seconds from the start until
        each request's first token is on the host."""
        rows = min(n, PREFILL_ROWS)
        rng = np.random.default_rng(n)
        start, done = time.perf_counter(), []
        for first in range(0, n, rows):
            slots = np.arange(first, first + rows) % n  # a last partial group repeats earlier rows
            tokens = rng.integers(0, self.cfg.vocab_size, (rows, prompt), dtype=np.int32)
            zeros = np.zeros(rows, np.int32)
            self.state, out = steps.prefill(
                self.spec, self.params, self.state, tokens, zeros, np.full(rows, prompt, np.int32),
                self.table[slots], zeros, np.zeros_like(tokens), False, self.window,
            )  # fmt: skip
            for r in range(min(rows, n - first)):
                self.state, first_token = steps.insert(
                    self.spec, self.state, slots[r], out.last_logits[r], self.row, prompt, 1 << 30, False
                )
            jax.device_get(first_token.tokens)
            done += [time.perf_counter() - start] * min(rows, n - first)
        return done

    def decode(self, n: int, count: int) -> float:
        """Seconds for `count` decode steps of the first n streams, dispatched back to back."""
        start = time.perf_counter()
        for _ in range(count):
            self.state, logits = steps.forward(self.spec, self.params, self.state, self.table, self.window, n)
            self.state, out = steps.sample_step(self.spec, self.state, logits)
        jax.device_get(out.tokens)
        return time.perf_counter() - start


def run_model(name, cfg: ModelConfig, attention: str, streams, prompt: int, count: int, memory: int, log, save):
    """Measure one model with one attention at each number of `streams` that fits; `save` each result."""
    context = prompt + 2 * count + 1  # the untimed pass's steps, then the timed ones
    per_stream = KVCache.bytes_per_token(cfg) * -(-context // PAGE_SIZE) * PAGE_SIZE
    fits = [
        n for n in streams if cfg.num_params() * jnp.dtype(cfg.dtype).itemsize + n * per_stream < MEMORY_SHARE * memory
    ]
    if not fits:
        log.info("%s: does not fit in %.1f GB", name, memory / 1e9)
        return
    t = time.perf_counter()
    bench = Bench(cfg, max(fits), context, attention)
    log.info("%s: weights and pool ready in %.1f s (attention %s)", name, time.perf_counter() - t, bench.cfg.attention)
    kind = jax.devices()[0].device_kind
    bw, fl = peak(kind) or (None, None)
    for n in fits:
        t = time.perf_counter()
        bench.first_tokens(n, prompt)  # compiles prefill and insert (once per group size)
        bench.decode(n, count)  # compiles this row count's steps
        compile_s = time.perf_counter() - t
        ttft = bench.first_tokens(n, prompt)
        seconds = bench.decode(n, count)
        step = seconds / count
        attended = prompt + count / 2  # mean position of the timed steps
        kv_read = n * attended * KVCache.bytes_per_token(cfg)
        result = dict(
            model=name, device=kind, dtype=cfg.dtype, attention=bench.cfg.attention, streams=n,
            prompt=prompt, ttft_p50_s=statistics.median(ttft), ttft_last_s=ttft[-1],
            decode_tok_s=n / step, step_ms=1e3 * step,
            mbu=None if bw is None else (weight_bytes(cfg) + kv_read) / step / bw,
            mfu=None if fl is None else flops(cfg, n, attended) / step / fl,
            prefill_mfu=None if fl is None else flops(cfg, n * prompt, prompt / 2) / ttft[-1] / fl,
            first_run_s=compile_s,
        )  # fmt: skip
        log.info("%s", result)
        save(result)


def table(results: list[dict]) -> str:
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"
    lines = [
        "| model | device | attention | streams | TTFT p50 (s) | TTFT last (s) | decode tok/s | ms/step | MBU | MFU "
        "| prefill MFU | first run (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} {r['dtype']} | {r['device']} | {r['attention']} | {r['streams']} | {r['ttft_p50_s']:.3f} "
            f"| {r['ttft_last_s']:.3f} | {r['decode_tok_s']:.1f} | {r['step_ms']:.2f} | {pct(r['mbu'])} "
            f"| {pct(r['mfu'])} | {pct(r['prefill_mfu'])} | {r['first_run_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: SmolLM2's shape, 1 and 8 streams, short")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    p.add_argument("--streams", nargs="+", type=int, default=None)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; --quick 32)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32; --quick 4)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument(
        "--attention",
        nargs="+",
        choices=["auto", *attention_kernels.LAYOUTS],
        default=["auto"],
        help="each model runs once per attention (auto: as `jaxserve serve` would choose here)",
    )
    p.add_argument("--out", type=Path, default=Path("bench_device"), help="writes OUT.json and OUT.md")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench_device")
    models = a.models or (["smollm2"] if a.quick else list(MODELS))
    streams = a.streams or ([1, 8] if a.quick else [1, 8, 64, 256])
    prompt, count = a.prompt or (32 if a.quick else 128), a.steps or (4 if a.quick else 32)
    memory = device_memory()
    log.info(
        "%s: %s, %.1f GB; jax %s", jax.default_backend(), jax.devices()[0].device_kind, memory / 1e9, jax.__version__
    )
    results: list[dict] = []

    def save(result: dict) -> None:  # after every figure: a run cut short keeps what it measured
        results.append(result)
        a.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        a.out.with_suffix(".md").write_text(table(results) + "\n")

    for name in models:
        cfg = dataclasses.replace(MODELS[name], dtype=a.dtype, max_context=prompt + 2 * count + 1)
        for attention in a.attention:
            run_model(name, cfg, attention, streams, prompt, count, memory, log, save)
            jax.clear_caches()
    print(table(results))


if __name__ == "__main__":
    main()
