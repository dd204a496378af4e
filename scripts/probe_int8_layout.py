"""Does the int8 kernels' layout at rest change a decode step's matmul time? A probe, nothing served.

    python scripts/probe_int8_layout.py [--model NAME] [--rows 1 4 32] [--repeats 11]

Every layer's int8 weight matmuls of the model (its own weights, 30 layers under one scan), widened to
float32 as the f32 formulation does, in two layouts: as stored (input axis first, [D, ...]: the
matrix-vector product accumulates rows of the widened copy) and output-major (a transposed copy made
once, [..., D]: each output is a dot product along a contiguous row). Runs interleaved, medians, per row
count; the layout is a property of the weights, so the transposed copy is not timed.

Read the one-row figures only: here each weight's input is the previous one's output resized, a chain
the real step does not have, and several rows through it cost far more than they do in the step (where
2 slots cost about 1.25x one slot, and running 2-4 rows as separate matrix-vector products did not pay:
measured with whole steps interleaved, 2 slots 44.3 -> 44.5 ms, 4 slots 64.4 -> 78.5 ms).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxserve.checkpoint import DEFAULT_MODEL, load_model
from jaxserve.sharding import make_mesh


def dequantize_last(kernel, scale):
    """kernel [O, D] int8, scale [O, D / group] -> float32 [O, D] (the group axis last)."""
    o, d = kernel.shape
    g = scale.shape[1]
    return (kernel.astype(jnp.float32).reshape(o, g, d // g) * scale[:, :, None]).reshape(o, d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    model = load_model(args.model, args.checkpoints, make_mesh(1, None), progress=False, quantize="int8")
    layers = model.params["params"]["layers"]
    # each weight as [L, D_in, O] (input axis grouped) and as [L, O, D_in], with its scales
    stored, transposed = {}, {}
    for name in sorted(layers):
        if name + "_scale" not in layers or name == "o":  # o's grouped axis is its second: left out
            continue
        kernel, scale = layers[name], layers[name + "_scale"]
        L, D = kernel.shape[:2]
        k, s = kernel.reshape(L, D, -1), scale.reshape(L, scale.shape[1], -1)
        stored[name] = (k, s)
        transposed[name] = (jnp.swapaxes(k, 1, 2).copy(), jnp.swapaxes(s, 1, 2).copy())

    def run(weights, out_major: bool):
        def f(x):
            def layer(acc, ws):
                for kernel, scale in ws.values():
                    d = kernel.shape[1] if out_major else kernel.shape[0]
                    rows_in = jnp.resize(x + acc, (x.shape[0], d))  # this weight's input width
                    if out_major:
                        y = rows_in @ dequantize_last(kernel, scale).T
                    else:
                        g = scale.shape[0]
                        w = (kernel.astype(jnp.float32).reshape(g, d // g, -1) * scale[:, None]).reshape(d, -1)
                        y = rows_in @ w
                    acc = acc + 1e-6 * jnp.mean(y)
                return acc, None

            return jax.lax.scan(layer, jnp.float32(0), weights)[0]

        return jax.jit(f)

    fns = {"as stored [D, O]": run(stored, False), "output-major [O, D]": run(transposed, True)}
    print(f"{model.name} int8, weights {', '.join(stored)} of {len(jax.tree.leaves(layers)[0])} layers")
    for rows in args.rows:
        x = jnp.linspace(-1, 1, rows * model.cfg.dim, dtype=jnp.float32).reshape(rows, model.cfg.dim)
        for f in fns.values():
            jax.block_until_ready(f(x))
        runs: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(args.repeats):
            for n, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(x))
                runs[n].append(1000 * (time.perf_counter() - t0))
        print(f"{rows} rows: " + ", ".join(f"{n} {statistics.median(ms):.2f} ms" for n, ms in runs.items()), flush=True)


if __name__ == "__main__":
    main()
