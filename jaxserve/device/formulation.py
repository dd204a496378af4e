"""Which arithmetic the int8 weight matmuls use on this machine: chosen once, before warm-up, and cached.

Three formulations pass the int8 fidelity bounds (tests/test_quantize.py checks them): "kernel", jaxserve's
own int8 matmul (jaxserve.kernels: each weight read once, widened in registers; CPU only, one device),
"f32", the int8 weights widened to float32 inside the step, and "bf16", the dequantized weights and the
activations rounded to bfloat16 with float32 accumulation. Which is fastest depends on the CPU (bfloat16
units or none) and on the rows a matmul carries, so on CPU `choose` times them on the model's own weight
matmuls at the decode row buckets and the short prefill chunks: the kernel against float32 from one row up
until the kernel loses, then bfloat16 against the faster of the others from the most rows down until
bfloat16 loses. It serves
bfloat16 from the smallest row count at and above which it won everywhere, and the kernel below that and
below the first row count where it lost to float32 (`quant.Formulation`'s kernel_below_rows and bf16_from_rows,
static in the jitted steps: the choice costs no recompilation after warm-up). GGUF block weights on a CPU
with AVX512-VNNI have a fourth, "q8": the block kernel on quantized activations, integer dot products: 8 bits
for the MLP's gate and up projections (blocks.Q8_INPUTS), 16 for the other weights and the logits (so it
passes the issue's fidelity bar, tests/test_blocks.py), the weights held interleaved for it (blocks.interleave).
It serves every row count or none: from some row count on only, a step's numerics would hang on its rows --
a prompt's continuation on the batch it joins and on whether its prefix was cached (seeded samples of one
chat request differed when asked twice, the second time from the prefix cache). At every row count a row's
outputs are the same whatever rows share its step (tests/test_blocks.py). `auto` measures it first, against
the kernel at each row count, and takes it where it is not slower (by MARGIN) at one row and faster (by
MARGIN) over all the row counts together (`q8_wins`; SmolLM2 on an AMD EPYC, a step's matmuls, ms
q8/kernel: 1 row 7.0/8.9, 8 rows 12.0/19.3, 32 rows 32.6/59.8, 64 rows 63.8/159.1). Where the kernels
have AMX tiles (jaxserve.kernels.tiles), "q8" is measured with them too (16 rows at a time, to the same
bits) and they serve where faster by MARGIN over all the row counts (`tiles_win`). On GPU and TPU
bfloat16 is the native choice and stands without measuring. Float weights are never rounded: float32 asked
for stays exact.

A choice is cached in a small JSON file in the compilation cache's folder, keyed by what decides it (CPU
model and cores or device kind, jax version, backend, the kernel's source, model and its config, weights,
mesh, slots), so a restart does not measure again.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxserve import host, kernels
from jaxserve.device.runner import PREFILL_BUCKETS
from jaxserve.model import LoadedModel, Transformer
from jaxserve.model import blocks as qblocks
from jaxserve.model.quant import (
    EVERY_ROW,
    QUANTIZED,
    Formulation,
    dot,
    grouped_axis,
    int8_names,
    int8_scopes,
    packed,
)

log = logging.getLogger(__name__)

FORMULATIONS = ("auto", "f32", "bf16", "kernel", "q8")
CACHE_FILE = "jaxserve-formulations.json"
MARGIN = 0.97  # a candidate must win by 3% at a row count to be taken there
SHORT_PREFILL = 64  # tokens: the prefill chunks up to this many are measured too
PROCEDURE = 6  # how `choose` decides: a cached choice made another way is made again
REPEATS = 5  # timed runs of each candidate at each row count, interleaved; medians compared

Timings = dict[int, dict[str, float]]  # rows -> {"f32": ms, "kernel": ms, ...}: medians, those measured


@dataclasses.dataclass(frozen=True)
class Choice:
    """What the int8 matmuls use (`bf16_from_rows` and `kernel_below_rows`, as in quant.Formulation), how that
    was decided ("measured", "cached", "forced", "platform" or "float weights") and the timings it rests
    on."""

    bf16_from_rows: int | None
    source: str
    timings: Timings = dataclasses.field(default_factory=dict)
    kernel_below_rows: int | None = None
    q8: bool = False
    tiles: bool = False

    @property
    def formulation(self) -> Formulation:
        return Formulation(self.kernel_below_rows, self.bf16_from_rows, self.q8, self.tiles)

    def apply(self, model: LoadedModel) -> LoadedModel:
        """`model` to serve with this choice: it carries the formulation, and with the kernel its int8 weights
        are packed (block weights are held as the kernel reads them)."""
        if self.kernel_below_rows is None:
            return dataclasses.replace(model, formulation=self.formulation)
        assert kernels.available(), "the kernels are not available here"  # compiled and registered
        if model.cfg.quant == "blocks":
            tree = jax.tree_util.tree_map(lambda a: a, model.params)  # a copy of the containers
            formats = dict(model.cfg.block_formats)
            tree["params"] = qblocks.interleave_params(tree["params"], formats, self.formulation)
            return dataclasses.replace(model, formulation=self.formulation, params=tree)
        return dataclasses.replace(model, formulation=self.formulation, params=packed(model.params, model.cfg))

    def describe(self, cfg) -> str:
        text = f"matmul formulation {self.formulation.describe(cfg)} ({self.source}"
        if self.timings:
            names = [n for n in (*Q8, "kernel", "f32", "bf16") if any(n in t for t in self.timings.values())]
            per_rows = ", ".join(
                f"{r}: " + "/".join(f"{t[n]:.1f}" if n in t else "-" for n in names)
                for r, t in sorted(self.timings.items())
            )
            text += f"; int8 weight matmuls of one decode step, ms {'/'.join(names)} by rows: {per_rows}"
        return text + ")"


def row_buckets(slots: int) -> tuple[int, ...]:
    """The row counts measured, ascending: the decode steps' (powers of two below the slots, and the slots)
    and a short prompt's prefill chunks (up to SHORT_PREFILL tokens), which decide its first token's time."""
    decode = {r for r in (1 << i for i in range(20)) if r < slots} | {slots}
    return tuple(sorted(decode | {b for b in PREFILL_BUCKETS if b <= SHORT_PREFILL}))


def bf16_threshold(timings: Timings) -> int | None:
    """The smallest measured row count from which bfloat16 wins (by MARGIN) at every measured count, against
    float32 and the kernel where it was measured, or None."""
    threshold = None
    for rows in sorted(timings, reverse=True):
        t = timings[rows]
        if t["bf16"] >= MARGIN * min(t["f32"], t.get("kernel", float("inf"))):
            break
        threshold = rows
    return threshold


def kernel_possible(model: LoadedModel) -> bool:
    """Whether jaxserve's int8 kernel can serve `model`: int8 weights of shapes it takes, on one CPU device,
    with the kernel compiled here; or GGUF block weights (every shape)."""
    if model.cfg.quant not in QUANTIZED or jax.default_backend() != "cpu" or model.mesh.size != 1:
        return False
    if model.cfg.quant == "blocks":
        return kernels.available()
    for scope, lead in int8_scopes(model.params):
        for name in int8_names(scope):
            kernel, scale = scope[name].shape[lead:], scope[name + "_scale"].shape[lead:]
            if not kernels.fits(kernel, scale, grouped_axis(kernel, scale) + 1):
                return False
    return kernels.available()


def q8_wins(timings: Timings) -> bool:
    """Whether quantized activations serve, from the timings of "q8" and "kernel" at each row count: not
    slower by MARGIN at the fewest rows (a single stream's step), and faster by it over all the row counts
    together (at a few rows they are about even: SmolLM2 on an AMD EPYC, 2 and 4 rows 13.2/13.6 and
    14.3/14.0 ms, where 1 row is 5.9/6.6 and 32 rows 48.4/65.7)."""
    fewest = timings[min(timings)]
    total = {n: sum(t[n] for t in timings.values()) for n in ("q8", "kernel")}
    return fewest["q8"] * MARGIN <= fewest["kernel"] and total["q8"] < MARGIN * total["kernel"]


def tiles_win(timings: Timings) -> bool:
    """Whether quantized activations take AMX tiles, from the timings of "q8_tiles" and "q8" at each row
    count: faster by MARGIN over all the row counts together (below 16 rows they compute alike)."""
    return sum(t["q8_tiles"] for t in timings.values()) < MARGIN * sum(t["q8"] for t in timings.values())


def q8_possible(model: LoadedModel) -> bool:
    """Whether the block kernel can serve `model` on quantized activations: GGUF block weights, AVX512-VNNI."""
    return kernel_possible(model) and model.cfg.quant == "blocks" and kernels.vnni()


def matmul_step(model: LoadedModel) -> Callable:
    """A jitted function of (params, x [rows, 1, D]) running what the formulation (`model`'s, its
    weights as `Choice.apply` left them) changes in one decode step: every layer's int8 weight matmuls
    (each weight grouped as stored, through the model's `dot`) and the logits over the vocabulary (through
    the model's own `logits`)."""
    cfg = model.cfg
    letters = "cdefghijklmnopqrsuvwxyz"

    def run(params, x):
        layers = params["params"]["layers"]
        weights = {n: (layers[n], layers[n + "_scale"]) for n in int8_names(layers)}
        block_weights = qblocks.stacks(layers, dict(cfg.block_formats))

        def layer(acc, index):
            rows_in = x + acc
            for w in block_weights.values():
                inputs = jnp.resize(rows_in, (x.shape[0], 1, w.arrays[1].shape[-1] * qblocks.QK))
                acc = acc + 1e-6 * jnp.mean(dot("", inputs, w.at(index), model.formulation))
            for kernel, scale in weights.values():  # each layer read from the stack, as the model reads it
                a = grouped_axis(kernel.shape[1:], scale.shape[1:])  # the inputs are the axes up to it
                ins, outs = letters[: a + 1], letters[a + 1 : kernel.ndim - 1]
                inputs = jnp.resize(rows_in, (x.shape[0], 1, *kernel.shape[1 : a + 2]))
                y = dot(f"bt{ins},{ins}{outs}->bt{outs}", inputs, (kernel, scale, index), model.formulation)
                acc = acc + 1e-6 * jnp.mean(y)
            return acc, None

        acc, _ = jax.lax.scan(layer, jnp.float32(0), jnp.arange(cfg.n_layers))
        return Transformer(cfg, model.formulation).apply(params, x + acc, method="logits")

    return jax.jit(run)


CANDIDATES = {  # each formulation alone, at every row count
    "f32": Choice(None, "forced"),
    "bf16": Choice(1, "forced"),
    "kernel": Choice(None, "forced", kernel_below_rows=EVERY_ROW),
    # the block kernel on quantized activations (AVX512-VNNI; blocks.x_bits), at every row count (see above)
    "q8": Choice(None, "forced", kernel_below_rows=EVERY_ROW, q8=True),
    "q8_tiles": Choice(None, "forced", kernel_below_rows=EVERY_ROW, q8=True, tiles=True),  # and AMX tiles
}
Q8 = ("q8", "q8_tiles")


def measure(model: LoadedModel, rows: tuple[int, ...], names=("f32", "bf16"), repeats: int = REPEATS) -> Timings:
    """Median ms of the formulations `names` (of CANDIDATES) at each row count, runs interleaved (a shared
    machine's noise falls on all alike)."""
    served = {name: CANDIDATES[name].apply(model) for name in names}
    fns = {name: (matmul_step(m), m.params) for name, m in served.items()}
    timings: Timings = {}
    for r in rows:
        x = jnp.linspace(-1, 1, r * model.cfg.dim, dtype=jnp.float32).reshape(r, 1, model.cfg.dim)
        for fn, params in fns.values():
            jax.block_until_ready(fn(params, x))  # compile, and one untimed run
        runs: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, (fn, params) in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(params, x))
                runs[name].append(1000 * (time.perf_counter() - t0))
        timings[r] = {name: statistics.median(ms) for name, ms in runs.items()}
    return timings


def machine() -> str:
    """The CPU model and cores on CPU, the device kind otherwise."""
    if jax.default_backend() != "cpu":
        return f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    return f"{host.cpu_model()}, {os.cpu_count()} cores"


def cache_key(model: LoadedModel, slots: int) -> str:
    """What decides the choice: machine, jax version and backend, the kernel (its source, or none), model
    (name and config), weights, mesh, slots."""
    cfg = hashlib.sha256(model.cfg.to_json().encode()).hexdigest()[:12]
    mesh = ",".join(f"{k}={v}" for k, v in model.mesh.shape.items())
    weights = model.cfg.quant or model.cfg.dtype
    kernel = f"kernel {kernels.version()}" if kernel_possible(model) else "no kernel"
    return (
        f"choice {PROCEDURE} | {machine()} | jax {jax.__version__} {jax.default_backend()} | {kernel} | "
        f"{model.name} {cfg} | weights {weights}, activations {model.cfg.dtype} | mesh {mesh} | {slots} slots"
    )


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, key: str, choice: Choice) -> None:
    entries = _read(path)
    entries[key] = {
        "bf16_from_rows": choice.bf16_from_rows,
        "kernel_below_rows": choice.kernel_below_rows,
        "q8": choice.q8,
        "tiles": choice.tiles,
        "timings_ms": {str(r): t for r, t in sorted(choice.timings.items())},
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
    os.replace(tmp, path)  # a concurrent reader sees the old file or the new one, never half of one


def kernel_threshold(timings: Timings, bf16_from_rows: int | None) -> int | None:
    """The smallest measured row count, from one up, at which the kernel does not beat (by MARGIN) what
    would serve those rows without it (bfloat16 from `bf16_from_rows`, float32 below): the kernel serves
    fewer rows than that. None where it loses at the fewest; past the most where it never loses."""
    measured = sorted(r for r in timings if "kernel" in timings[r])
    for rows in measured:
        other = "bf16" if bf16_from_rows is not None and rows >= bf16_from_rows else "f32"
        if timings[rows]["kernel"] >= MARGIN * timings[rows][other]:
            return rows if rows > measured[0] else None
    return measured[-1] + 1 if measured else None


def choose(
    model: LoadedModel,
    slots: int,
    formulation: str = "auto",
    cache_dir: Path | None = None,
    timer: Callable[..., Timings] = measure,
) -> Choice:
    """The formulation to serve `model` with over `slots` slots: `formulation` "f32", "bf16", "kernel" or
    "q8" forces one ("q8" with AMX tiles where the kernels have them); "auto" measures on CPU (or reads the
    cache in `cache_dir`, None: no cache) and takes bfloat16 elsewhere. `timer(model, rows, names)` answers
    Timings as `measure` does."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r} (choose from {', '.join(FORMULATIONS)})")
    if model.cfg.quant not in QUANTIZED:
        if formulation in ("bf16", "kernel", "q8"):
            raise ValueError(
                f"--formulation {formulation} applies to quantized weights; float weights compute in their own dtype "
                "(--dtype bfloat16 for bfloat16 ones)"
            )
        return Choice(None, "float weights")
    if formulation == "q8":
        if not q8_possible(model):
            raise ValueError("--formulation q8 needs GGUF block weights and the kernels built for AVX512-VNNI")
        return CANDIDATES["q8_tiles" if kernels.tiles() else "q8"]
    if formulation == "kernel":
        if not kernel_possible(model):
            raise ValueError(
                "--formulation kernel needs a CPU backend, one device, a C++ compiler and weights of the shapes the "
                "kernel takes (output channels and scale groups multiples of 16)"
            )
        return CANDIDATES["kernel"]
    if formulation != "auto":
        return Choice(None if formulation == "f32" else 1, "forced")
    if jax.default_backend() != "cpu":
        return Choice(1, f"platform: {jax.default_backend()}")
    key = cache_key(model, slots)
    path = None if cache_dir is None else Path(cache_dir) / CACHE_FILE
    if path is not None and (entry := _read(path).get(key)) is not None:
        timings = {int(r): t for r, t in entry["timings_ms"].items()}
        kernel, q8, tiles = entry.get("kernel_below_rows"), entry.get("q8", False), entry.get("tiles", False)
        return Choice(entry["bf16_from_rows"], f"cached in {path}", timings, kernel, q8, tiles)
    t0 = time.perf_counter()
    timings: Timings = {}
    buckets = row_buckets(slots)
    if q8_possible(model):
        timings = timer(model, buckets, ("q8", "kernel", *(("q8_tiles",) if kernels.tiles() else ())))
        q8 = "q8_tiles" if "q8_tiles" in timings[buckets[0]] and tiles_win(timings) else "q8"
        if q8_wins({r: t | {"q8": t[q8]} for r, t in timings.items()}):
            source = f"measured in {time.perf_counter() - t0:.1f} s"
            choice = dataclasses.replace(CANDIDATES[q8], source=source, timings=timings)
            if path is not None:
                _write(path, key, choice)
            return choice
    timings = {r: {n: ms for n, ms in t.items() if n in Q8} for r, t in timings.items()}  # shown, not used
    below = 0  # the kernel serves fewer rows than this
    if kernel_possible(model):
        for rows in buckets:  # from one row up, against float32: above a loss nothing counts
            timings.setdefault(rows, {}).update(timer(model, (rows,), ("kernel", "f32"))[rows])
            if timings[rows]["kernel"] >= MARGIN * timings[rows]["f32"]:
                break
            below = rows + 1
    for rows in reversed(buckets):  # bfloat16 from the most rows down, until the kernel or float32 wins
        names = ("bf16",) if "f32" in timings.get(rows, {}) else ("f32", "bf16")
        timings.setdefault(rows, {}).update(timer(model, (rows,), names)[rows])
        if bf16_threshold({rows: timings[rows]}) is None:
            break
    bf16 = bf16_threshold({r: t for r, t in timings.items() if "bf16" in t})
    kernel = kernel_threshold(timings, bf16) if below else None
    choice = Choice(bf16, f"measured in {time.perf_counter() - t0:.1f} s", timings, kernel)
    if path is not None:
        _write(path, key, choice)
    return choice
