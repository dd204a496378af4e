"""Where one decode step's time goes: the engine's `steps.forward` and `steps.sample_step`, traced with
`jax.profiler`, their XLA:CPU thunks summed by the part of the step they come from.

    python scripts/profile_step.py [--model NAME] [--slots 1 32] [--position 160] [--steps 20]
                                   [--formulation auto f32 bf16 kernel] [--temperature 0] [--top-p 1]
                                   [--trace-dir DIR] [--kv-cache-dtype bfloat16] [--attention auto plain]

For each slot count S and each --attention (auto: as `jaxserve serve` would choose it here): an engine
core of S slots (bench_engine's 2048-token context and page pool), every slot active at --position (the
middle of bench_engine's 32 + 128 tokens) with the given sampling knobs, decoded --steps times back to
back, each step's tokens fetched as the scheduler fetches them. Prints the step's wall time (median,
untraced and traced), then each component's milliseconds per step: the self time of its thunks in the
trace (a loop's or branch's own time without what it runs), averaged over the steps. A thunk's component
is the innermost function of its Python stack that COMPONENTS names (XLA keeps each instruction's stack in
the module), the logits apart (under Transformer.logits). XLA:CPU may run two thunks at once on two cores,
so the components can add to more than the time the device was busy (some thunk running); the wall time
minus that is dispatch, transfers and the fetch ("host").
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.checkpoint import DEFAULT_MODEL, load_model
from jaxserve.device import steps
from jaxserve.device.build import DEFAULT_CONTEXT, pool_pages
from jaxserve.device.formulation import FORMULATIONS, choose
from jaxserve.device.runner import PAGE_SIZE, JaxRunner, bucket_of
from jaxserve.model import attention_kernels
from jaxserve.model.config import KV_DTYPES
from jaxserve.sharding import make_mesh

# the innermost function of an instruction's Python stack that is named here gives its component
COMPONENTS = {
    "dequantize": "int8 widening",
    "dot": "weight matmuls",
    "int8_matmul": "weight matmuls",
    "block_matmul": "weight matmuls",
    "KVCache.read": "KV page gather",
    "KVCache.write": "KV write",
    "write_targets": "KV write",
    "paged_attention": "attention (scores, softmax, values)",
    "attention": "attention (scores, softmax, values)",  # jaxserve.kernels.attention (the CPU kernel)
    "RMSNorm.__call__": "norms, RoPE, activation, residual",
    "apply_rope": "norms, RoPE, activation, residual",
    "rope_tables": "norms, RoPE, activation, residual",
    "Block.__call__": "norms, RoPE, activation, residual",
    "Embedding.__call__": "embedding",
    "top_logprobs": "top-20 logprobs (log_softmax, top_k)",
    "_constrain": "sampling: grammar mask",
    "unpack_mask": "sampling: grammar mask",
    "_top_p_mask": "sampling: top_p",
    "_draw": "sampling: temperature draw",
    "sample": "sampling: bias, penalties, greedy",
    "record": "sampling: record counts",
    "step": "step bookkeeping",
}


def _table(hlo_text: str, section: str) -> dict[int, str]:
    """One of the id tables at the head of an HLO module's text (FunctionNames, StackFrames, ...)."""
    out, inside = {}, False
    for line in hlo_text.splitlines():
        if line == section:
            inside = True
        elif inside and not line.strip():
            break
        elif inside:
            key, _, value = line.partition(" ")
            out[int(key)] = value
    return out


def classify(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> component. An instruction without a stack takes an operand's component
    (a dot fed by a widened weight: that weight's matmul)."""
    functions = {k: v.strip('"') for k, v in _table(hlo_text, "FunctionNames").items()}
    locations = {
        k: int(m.group(1))
        for k, v in _table(hlo_text, "FileLocations").items()
        if (m := re.search(r"function_name_id=(\d+)", v))
    }
    frames = {k: tuple(int(x) for x in re.findall(r"=(\d+)", v)) for k, v in _table(hlo_text, "StackFrames").items()}

    def stack(frame: int) -> list[str]:  # innermost first
        names, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc, parent = frames[frame]
            names.append(functions.get(locations.get(loc, 0), "?"))
            frame = parent
        return names

    labels: dict[str, str] = {}
    operands: dict[str, list[str]] = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?\b[\w\-]+\((.*?)\)", line)
        if not m:
            continue
        name = m.group(1)
        operands[name] = re.findall(r"%([\w.\-]+)", m.group(2))
        f = re.search(r"stack_frame_id=(\d+)", line)
        comp = next((COMPONENTS[n] for n in stack(int(f.group(1))) if n in COMPONENTS), None) if f else None
        if comp is not None:
            labels[name] = "logits: " + comp if "Transformer.logits" in line else comp
    for name, ops in operands.items():
        if name not in labels and (found := [labels[o] for o in ops if o in labels]):
            labels[name] = found[-1].replace("int8 widening", "weight matmuls")
    return labels


def self_times(trace_dir: Path, instructions: set[tuple[str, str]]) -> tuple[dict[tuple, float], float]:
    """Self µs of each traced thunk of the step (its time less the thunks nested in it, on its thread),
    and the µs during which at least one thread ran one."""
    path = next(trace_dir.rglob("*.trace.json.gz"))
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads: dict[tuple, list] = collections.defaultdict(list)
    for e in events:
        key = ((e.get("args") or {}).get("hlo_module"), e.get("name"))  # one module's instruction
        if e.get("ph") == "X" and key in instructions:
            threads[e["pid"], e["tid"]].append((e["ts"], e["ts"] + e["dur"], key))
    totals: dict[tuple, float] = collections.defaultdict(float)
    for spans in threads.values():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[list] = []  # [end, name, self time]
        for start, end, name in spans:
            while stack and stack[-1][0] <= start:
                done = stack.pop()
                totals[done[1]] += done[2]
            if stack:
                stack[-1][2] -= end - start
            stack.append([end, name, end - start])
        for done in stack:
            totals[done[1]] += done[2]
    busy, reach = 0.0, float("-inf")
    for start, end, _ in sorted(s for spans in threads.values() for s in spans):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return totals, busy


def prepare(core: JaxRunner, active: int, position: int, temperature: float, top_p: float) -> np.ndarray:
    """The first `active` slots decoding at `position` with pages enough for it and the given knobs; returns
    the page table."""
    table = core.empty_table()
    need = position // core.page_size + 1
    assert active * need <= core.pages
    for s in range(active):
        table[s, :need] = np.arange(s * need, (s + 1) * need)
    S = core.slots
    full = lambda value, dtype: jnp.full((S,), value, dtype)
    core.state = core.state.replace(
        slots=core.state.slots.replace(
            tokens=full(42, jnp.int32),
            positions=full(position, jnp.int32),
            active=jnp.arange(S) < active,
            remaining=full(1 << 30, jnp.int32),
            stop_on_eos=full(False, bool),
        ),
        sampling=core.state.sampling.replace(
            temperature=full(temperature, jnp.float32), top_p=full(top_p, jnp.float32)
        ),
    )
    return table


def run_steps(core: JaxRunner, table, active: int, position: int, n: int) -> list[float]:
    """ms of each of n steps of the first `active` slots, each to its tokens on the host."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.device_get(core.sample(core.forward(table, position, active - 1)).tokens)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def profile(model, slots: int, attention: str, args, trace_root: Path) -> None:
    m = choose(model, slots, args.formulation).apply(model)
    cfg = m.cfg.with_kv_dtype(args.kv_cache_dtype)  # the pool's dtype and the attention, as build_runner
    if attention == "auto":
        cfg = attention_kernels.choose(cfg, m.mesh, PAGE_SIZE)
    else:
        cfg = dataclasses.replace(cfg, attention=attention)
    m = dataclasses.replace(m, cfg=cfg)
    held = max(slots, args.max_slots)  # the server's slots, of which `slots` decode
    pages = pool_pages(m.cfg, PAGE_SIZE, held, DEFAULT_CONTEXT)
    core = JaxRunner(m, slots=held, cache_len=DEFAULT_CONTEXT, eos_id=None, pages=pages)
    table = prepare(core, slots, args.position, args.temperature, args.top_p)
    window, rows = core.window_for(args.position), bucket_of(slots, core.row_buckets)
    forward = steps.forward.lower(core.spec, m.params, core.state, table, None, window, rows).compile().as_text()
    logits = jax.ShapeDtypeStruct((rows, m.cfg.vocab_size), jnp.float32)
    sample = steps.sample_step.lower(core.spec, core.state, logits).compile().as_text()
    modules = {"jit_forward": forward, "jit_sample_step": sample}  # the step's two halves, as traced
    labels = {(m, name): label for m, text in modules.items() for name, label in classify(text).items()}
    instructions = {
        (m, name) for m, text in modules.items() for name in re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", text, re.M)
    }
    run_steps(core, table, slots, args.position, 3)  # compile and warm
    wall = run_steps(core, table, slots, args.position, args.steps)
    trace_dir = trace_root / f"slots{slots}-{m.cfg.attention}"
    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        traced = run_steps(core, table, slots, args.position, args.steps)
    totals, busy = self_times(trace_dir, instructions)
    per_step = lambda us: us / args.steps / 1000
    by_comp: dict[str, float] = collections.defaultdict(float)
    unlabeled: dict[tuple, float] = collections.defaultdict(float)
    for name, us in totals.items():
        by_comp[labels.get(name, "other")] += per_step(us)
        if name not in labels:
            unlabeled[name] += per_step(us)
    total = sum(by_comp.values())
    by_comp["host: wall (traced) - device busy"] = statistics.mean(traced) - per_step(busy)  # both means
    print(
        f"\n{m.name} {m.cfg.quant or m.cfg.dtype} {m.formulation.describe(m.cfg)}, {slots} of {held} slots at position "
        f"{args.position}, KV pool {m.cfg.cache_dtype}, attention {m.cfg.attention} "
        f"(window {window}), temperature {args.temperature}, top_p {args.top_p}: step {statistics.median(wall):.2f} ms "
        f"median untraced, {statistics.median(traced):.2f} ms traced; thunks {total:.2f} ms/step, "
        f"device busy (a thunk running) {per_step(busy):.2f} ms/step. Trace: {trace_dir}"
    )
    print("| component | ms/step | share of thunks |\n|---|---|---|")
    for comp, ms in sorted(by_comp.items(), key=lambda kv: -kv[1]):
        print(f"| {comp} | {ms:.3f} | {100 * ms / total:.1f}% |")
    if top := sorted(unlabeled.items(), key=lambda kv: -kv[1])[:6]:
        print("other, largest: " + ", ".join(f"{m}:{n} {ms:.3f}" for (m, n), ms in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--weights", choices=["float32", "int8", "gguf"], default="int8")
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--max-slots", type=int, default=0, help="slots the engine holds, of which --slots decode (default: as many)"
    )
    parser.add_argument("--position", type=int, default=160)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--formulation", choices=FORMULATIONS, default="auto")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--trace-dir", help="keep the traces here (default: a temporary folder)")
    parser.add_argument(
        "--attention",
        choices=["auto", *attention_kernels.LAYOUTS],
        nargs="+",
        default=["auto"],
        help="each slot count runs once per attention (auto: as `jaxserve serve` would choose here)",
    )
    parser.add_argument("--kv-cache-dtype", choices=["auto", *KV_DTYPES], default="auto", help="the KV pool's dtype")
    args = parser.parse_args()
    model = load_model(
        args.model,
        args.checkpoints,
        make_mesh(1, None),
        progress=False,
        quantize=None if args.weights == "float32" else args.weights,
    )
    trace_root = Path(args.trace_dir or tempfile.mkdtemp(prefix="profile_step-"))
    for slots in args.slots:
        for attention in args.attention:
            profile(model, slots, attention, args, trace_root)


if __name__ == "__main__":
    main()
