"""The 1-row weight matmuls' bandwidth against a plain read of the same bytes, in the same process.

    python scripts/bench_bandwidth.py [--quantize gguf int8] [--rows 1] [--repeats 30] [--isa avx2]
                                      [--formulation kernel|q8]

For each weight format, one jitted pass over every layer's matmul weights as a decode step reads them (the
layer stacks, each layer read in place by jaxserve's kernel; `--rows` rows of activations), and one pass
reading the very same bytes on the same threads with nothing computed (jaxserve.kernels.read_bytes), with the
kernels of the path `--isa` (jaxserve.kernels.ISAS; the one that serves here by default), the block weights
on float activations (`--formulation kernel`) or quantized ones, interleaved, as they serve on a path with
AVX512-VNNI (q8, the default there). Prints
both as GB/s and their ratio, medians and fastest of interleaved runs, with the load average: the machine may be
shared.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxserve import kernels
from jaxserve.checkpoint import load_model
from jaxserve.device.formulation import CANDIDATES
from jaxserve.model import blocks
from jaxserve.model.quant import grouped_axis
from jaxserve.sharding import make_mesh


def weights(model) -> list[tuple[str, tuple, int]]:
    """(how the kernel reads it, the arrays of one weight stacked over the layers, the bits of the
    activations it multiplies: blocks.x_bits), for every layer matmul."""
    layers = model.params["params"]["layers"]
    if model.cfg.quant == "blocks":
        stacked = blocks.stacks(layers, dict(model.cfg.block_formats)).values()
        return [(w.fmt, w.arrays, blocks.x_bits(w, model.formulation)) for w in stacked]
    return [("int8", (layers[n], layers[n + "_scale"]), 32) for n in sorted(layers) if n + "_scale" in layers]


def kernel_pass(ws: list[tuple[str, tuple, int]], n_layers: int, isa: str | None = None):
    """One jitted pass (arrays, x [rows, D]) -> a scalar: every weight of `ws` (as `weights` lists them) of
    every layer multiplied by x (resized to its inputs) with the kernel of path `isa`."""

    def run(arrays, x):
        def layer(acc, i):
            for (how, _, bits), a in zip(ws, arrays):
                if how == "int8":
                    contracted = grouped_axis(a[0].shape[1:], a[1].shape[1:]) + 1
                    k = math.prod(a[0].shape[1 : 1 + contracted])
                    xk = jnp.resize(x + acc, (x.shape[0], k))
                    y = kernels.int8_matmul(xk, *a, contracted, i, isa=isa)
                else:
                    xk = jnp.resize(x + acc, (x.shape[0], a[1].shape[-1] * blocks.QK))
                    stack = tuple(p.reshape(p.shape[0], -1, p.shape[-1]) for p in a)
                    y = kernels.block_matmul(xk, how, *stack, layer=i, x_bits=bits, invariant=bits < 32, isa=isa)
                acc = acc + 1e-6 * y[0, 0]
            return acc, None

        return jax.lax.scan(layer, jnp.float32(0), jnp.arange(n_layers))[0]

    return jax.jit(run)


def read_pass(n_layers: int, isa: str | None = None):
    """One jitted pass (arrays) -> a scalar: every byte of every layer of the arrays read, nothing computed."""

    def run(arrays):
        def layer(acc, i):
            for a in arrays:
                acc = acc + kernels.read_bytes(a, i, isa=isa)[0]
            return acc, None

        return jax.lax.scan(layer, jnp.float32(0), jnp.arange(n_layers))[0]

    return jax.jit(run)


def timings(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each call (a function of nothing), `repeats` times, interleaved, after one untimed call."""
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            runs[name].append(time.perf_counter() - t0)
    return runs


def kernel_against_read(ws: list[tuple[str, tuple, int]], n_layers: int, x, repeats: int, isa: str | None = None):
    """Kernel and read passes over the weights `ws`, timed interleaved -> their runs' seconds."""
    kernel, read = kernel_pass(ws, n_layers, isa), read_pass(n_layers, isa)
    arrays = [a for _, a, _ in ws]
    return timings({"kernel": lambda: kernel(arrays, x), "read": lambda: read(arrays)}, repeats)


def summary(runs: dict[str, list[float]], nbytes: int, pick) -> str:
    """The kernel's and the read's time (by `pick` of their runs) and bandwidth, and their ratio."""
    ms = {n: 1000 * pick(r) for n, r in runs.items()}
    gbs = {n: nbytes / t / 1e6 for n, t in ms.items()}
    return (
        f"kernel {ms['kernel']:.2f} ms = {gbs['kernel']:.1f} GB/s, plain read {ms['read']:.2f} ms = "
        f"{gbs['read']:.1f} GB/s: kernel at {100 * ms['read'] / ms['kernel']:.0f}% of the read"
    )


def measure(model, label: str, rows: int, repeats: int, isa: str | None) -> None:
    ws = weights(model)
    nbytes = sum(part.nbytes for _, a, _ in ws for part in a)
    runs = kernel_against_read(ws, model.cfg.n_layers, jnp.ones((rows, model.cfg.dim), jnp.float32), repeats, isa)
    # the median, and the fastest run: on a shared machine the one least disturbed by the others' load
    for how, pick in (("median", statistics.median), ("fastest", min)):
        print(
            f"{label} ({model.formulation.describe(model.cfg)}, {isa or kernels.best().name}): "
            f"{nbytes / 1e6:.1f} MB of layer weights, {rows} row(s), {how} of {repeats}: {summary(runs, nbytes, pick)}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    p.add_argument("--quantize", nargs="+", default=["gguf", "int8"], choices=["gguf", "int4", "int8"])
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--isa", choices=[i.name for i in kernels.ISAS], help="the kernels' path (default: the best here)")
    p.add_argument(
        "--formulation",
        choices=["kernel", "q8"],
        help="the block weights' (default: q8, quantized activations, where the CPU has AVX512-VNNI)",
    )
    args = p.parse_args()
    assert kernels.available(args.isa), "the kernels need a C++ compiler and the CPU backend"
    path = next(i for i in kernels.ISAS if i.name == (args.isa or kernels.best().name))
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()}", flush=True)
    for q in args.quantize:
        model = load_model(args.model, args.checkpoints, make_mesh(1, 1), progress=False, quantize=q)
        q8 = q != "int8" and (args.formulation or ("q8" if path.q8 else "kernel")) == "q8"
        model = CANDIDATES["q8" if q8 else "kernel"].apply(model)  # held as the kernel reads them
        measure(model, q, args.rows, args.repeats, args.isa)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
