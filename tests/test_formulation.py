"""The int8 matmuls' formulation: `dot`'s rule by rows, the choice (forced, float weights, off CPU,
measured, cached under its key), and no recompiles after warm-up with a mixed rule. The bfloat16
formulation's fidelity against the reference: tests/test_quantize.py."""

import dataclasses
import json
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxserve.api.metrics import Metrics
from jaxserve.checkpoint import convert_hf, load_checkpoint
from jaxserve.device import formulation
from jaxserve.device.build import build_engine
from jaxserve.device.formulation import (
    CACHE_FILE,
    CANDIDATES,
    Choice,
    bf16_threshold,
    cache_key,
    choose,
    kernel_threshold,
    matmul_step,
    measure,
)
from jaxserve.engine.bridge import complete
from jaxserve.engine.types import EngineRequest, SamplingParams
from jaxserve.model.quant import EVERY_ROW, Formulation, dot
from jaxserve.sharding import make_mesh

TINY_LLAMA = Path(__file__).parent / "reference" / "hf-tiny" / "llama"


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    out = convert_hf(TINY_LLAMA, tmp_path_factory.mktemp("int8") / "ckpt", progress=False, quantize="int8")
    return load_checkpoint(out, make_mesh(1, 1))


def timer(calls: list, timings: dict):
    """A stand-in for `measure`: records the row counts asked for and answers `timings`."""

    def fake(model, rows, names):
        calls.append(rows)
        return {r: {n: timings[r][n] for n in names} for r in rows}

    return fake


def ms(f32, bf16, kernel=None):
    return {"f32": f32, "bf16": bf16} | ({} if kernel is None else {"kernel": kernel})


def test_bfloat16_from_the_smallest_row_count_it_wins_at_and_above():
    assert bf16_threshold({1: ms(10, 20), 2: ms(10, 9), 4: ms(10, 5)}) == 2
    assert bf16_threshold({1: ms(10, 5), 2: ms(10, 11), 4: ms(10, 5)}) == 4  # a loss at 2 rows keeps 1 and 2 f32
    assert bf16_threshold({1: ms(10, 5), 2: ms(10, 5)}) == 1
    assert bf16_threshold({1: ms(10, 5), 2: ms(10, 9.8)}) is None  # a win inside the 3% margin is no win
    assert bf16_threshold({1: ms(10, 8, 5), 2: ms(10, 8, 9)}) == 2  # the kernel counts where measured


def test_dot_switches_by_rows():
    rng = np.random.default_rng(0)
    kernel = rng.integers(-127, 128, (64, 3), dtype=np.int8)
    scale = rng.uniform(0.01, 0.02, (1, 3)).astype(np.float32)
    x = rng.standard_normal((2, 1, 64)).astype(np.float32)
    w = kernel.astype(np.float32) * scale
    exact = np.einsum("btd,dv->btv", x, w)
    rule = Formulation(bf16_from_rows=2)
    one, two = (np.asarray(dot("btd,dv->btv", jnp.asarray(x[:r]), (kernel, scale), rule)) for r in (1, 2))
    np.testing.assert_allclose(one, exact[:1], rtol=1e-6)  # below the threshold: float32
    bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_allclose(two, np.einsum("btd,dv->btv", bf16(x), bf16(w)), rtol=1e-5)  # at it: bfloat16
    assert not np.allclose(two, exact, rtol=1e-6, atol=0)
    floats = np.asarray(dot("btd,dv->btv", jnp.asarray(x), (w, None), Formulation(bf16_from_rows=1)))
    np.testing.assert_allclose(floats, exact, rtol=1e-6)  # float weights stay float32, whatever the rule


def test_forced_float_weights_and_off_cpu(tiny_int8, tiny, monkeypatch):
    calls: list = []
    fake = timer(calls, {})
    assert choose(tiny_int8, 4, "f32", timer=fake) == Choice(None, "forced")
    assert choose(tiny_int8, 4, "bf16", timer=fake) == Choice(1, "forced")
    assert choose(tiny, 4, "auto", timer=fake) == Choice(None, "float weights")  # float32 stays exact
    for name in ("bf16", "kernel"):
        with pytest.raises(ValueError, match="quantized weights"):
            choose(tiny, 4, name)
    monkeypatch.setattr(formulation, "kernel_possible", lambda model: True)
    assert choose(tiny_int8, 4, "kernel", timer=fake).kernel_below_rows == EVERY_ROW
    monkeypatch.setattr(formulation, "kernel_possible", lambda model: False)
    with pytest.raises(ValueError, match="needs a CPU backend, one device"):
        choose(tiny_int8, 4, "kernel")
    with pytest.raises(ValueError, match="unknown formulation"):
        choose(tiny_int8, 4, "fast")
    monkeypatch.setattr(formulation.jax, "default_backend", lambda: "tpu")
    assert choose(tiny_int8, 4, "auto", timer=fake) == Choice(1, "platform: tpu")
    assert calls == []  # nothing was measured


def test_the_kernel_below_the_first_row_count_it_loses_at():
    assert kernel_threshold({1: ms(10, 20, 5), 2: ms(10, 20, 9), 4: ms(10, 20, 11)}, None) == 4
    assert kernel_threshold({1: ms(10, 20, 5), 2: ms(10, 8, 9)}, 2) == 2  # at 2 rows bfloat16 would serve
    assert kernel_threshold({1: ms(10, 20, 9.8)}, None) is None  # inside the margin: never the kernel
    assert kernel_threshold({1: ms(10, 20, 5), 2: ms(10, 20, 5)}, None) == 3  # never lost: past the most rows
    assert kernel_threshold({4: ms(10, 20)}, None) is None  # not measured


def test_the_choice_is_cached_under_its_key(tiny_int8, tmp_path, monkeypatch):
    monkeypatch.setattr(formulation, "kernel_possible", lambda model: False)
    calls: list = []
    prefills = {16: ms(10, 5), 32: ms(10, 5), 64: ms(10, 5)}  # the short prompts' chunks are measured too
    fake = timer(calls, {1: ms(10, 12), 2: ms(10, 8), 4: ms(10, 6), 8: ms(10, 5)} | prefills)
    first = choose(tiny_int8, 4, "auto", tmp_path, fake)
    assert calls == [(64,), (32,), (16,), (4,), (2,), (1,)]
    assert first.bf16_from_rows == 2 and first.source.startswith("measured")
    assert first.kernel_below_rows is None
    again = choose(tiny_int8, 4, "auto", tmp_path, fake)
    assert len(calls) == 6  # a restart reads the file
    assert again.source.startswith("cached") and (again.bf16_from_rows, again.timings) == (2, first.timings)
    choose(tiny_int8, 8, "auto", tmp_path, fake)  # other slots: other row buckets, measured
    bf16_weights = dataclasses.replace(tiny_int8, cfg=dataclasses.replace(tiny_int8.cfg, dtype="bfloat16"))
    choose(bf16_weights, 4, "auto", tmp_path, fake)  # another config of the model: measured
    assert calls[6:] == [(64,), (32,), (16,), (8,), (4,), (2,), (1,), (64,), (32,), (16,), (4,), (2,), (1,)]
    entries = json.loads((tmp_path / CACHE_FILE).read_text())
    assert len(entries) == 3 and cache_key(tiny_int8, 4) in entries
    key = cache_key(tiny_int8, 4)
    for part in (formulation.machine(), f"jax {jax.__version__} cpu", "no kernel", tiny_int8.name, "4 slots"):
        assert part in key
    calls.clear()
    slow = timer(calls, {1: ms(10, 5), 2: ms(10, 20), 4: ms(10, 8)} | prefills)
    assert choose(tiny_int8, 4, "auto", None, slow).bf16_from_rows == 4
    assert calls == [(64,), (32,), (16,), (4,), (2,)]  # below a loss nothing is measured
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert choose(tiny_int8, 4, "auto", tmp_path, fake).source.startswith("measured")  # a broken file: measure
    assert choose(tiny_int8, 4, "auto", None, fake).source.startswith("measured")  # no cache folder: measure


def test_the_kernel_is_measured_from_one_row_up(tiny_int8, tmp_path, monkeypatch):
    """The kernel against float32 from one row up until it loses, then bfloat16 from the most rows down
    until the faster of the others wins. The kernel's presence is part of the cache key."""
    monkeypatch.setattr(formulation, "kernel_possible", lambda model: True)
    monkeypatch.setattr(formulation.kernels, "version", lambda: "abc123")
    calls: list = []
    prefills = {16: ms(10, 5, 7), 32: ms(10, 5, 7), 64: ms(10, 5, 7)}
    fake = timer(calls, {1: ms(10, 12, 5), 2: ms(10, 8, 9), 4: ms(10, 6, 8), 8: ms(10, 5, 7)} | prefills)
    choice = choose(tiny_int8, 4, "auto", tmp_path, fake)
    # the kernel beats float32 at every row count; bfloat16 beats both down to 2 rows, not at 1
    assert calls == [(1,), (2,), (4,), (16,), (32,), (64,), (64,), (32,), (16,), (4,), (2,), (1,)]
    assert (choice.kernel_below_rows, choice.bf16_from_rows) == (2, 2)
    assert choice.describe(tiny_int8.cfg).startswith("matmul formulation kernel<2<=bf16 (measured")
    assert "kernel abc123" in cache_key(tiny_int8, 4)
    again = choose(tiny_int8, 4, "auto", tmp_path, fake)
    assert len(calls) == 12 and (again.kernel_below_rows, again.bf16_from_rows) == (2, 2)
    calls.clear()
    loses = timer(calls, {1: ms(10, 12, 5), 2: ms(10, 20, 11), 4: ms(10, 6, 8), 8: ms(10, 5, 7)} | prefills)
    choice = choose(tiny_int8, 8, "auto", None, loses)
    # the kernel loses at 2 rows; bfloat16 wins from 64 down to 4, loses at 2
    assert calls == [(1,), (2,), (64,), (32,), (16,), (8,), (4,), (2,)]
    assert (choice.kernel_below_rows, choice.bf16_from_rows) == (2, 4)


def test_measure_times_the_models_own_matmuls(tiny_int8):
    names = ("f32", "bf16", "kernel") if formulation.kernel_possible(tiny_int8) else ("f32", "bf16")
    timings = measure(tiny_int8, (1, 2), names, repeats=1)
    assert set(timings) == {1, 2} and all(set(t) == set(names) and min(t.values()) > 0 for t in timings.values())
    x = jnp.linspace(-1, 1, 2 * tiny_int8.cfg.dim, dtype=jnp.float32).reshape(2, 1, -1)
    out = {}
    for name in names:
        served = CANDIDATES[name].apply(tiny_int8)
        out[name] = np.asarray(matmul_step(served)(served.params, x))
    assert out["f32"].shape == (2, 1, tiny_int8.cfg.vocab_size)
    np.testing.assert_allclose(out["bf16"], out["f32"], atol=0.02 * np.abs(out["f32"]).max())
    if "kernel" in out:
        np.testing.assert_allclose(out["kernel"], out["f32"], rtol=1e-5, atol=1e-5 * np.abs(out["f32"]).max())


@pytest.mark.parametrize(
    "kernel, label",
    [
        (None, 'formulation="f32<2<=bf16",kernel_below_rows=""'),
        (2, 'formulation="kernel<2<=bf16",kernel_below_rows="2"'),
    ],
)
def test_no_recompiles_after_warmup_with_a_mixed_rule(tiny_int8, tmp_path, kernel, label):
    """float32 (or the kernel) at one row, bfloat16 from two (as a cached choice): every shape compiles in
    warm-up, and /metrics names the rule."""
    if kernel is not None and not formulation.kernel_possible(tiny_int8):
        pytest.skip("no C++ compiler or no CPU backend here: the kernel is never chosen")
    choice = Choice(2, "measured", {1: ms(1, 2)}, kernel)
    formulation._write(tmp_path / CACHE_FILE, cache_key(tiny_int8, 4), choice)
    engine = build_engine(tiny_int8, slots=4, max_context=128, formulation_cache=tmp_path)
    try:
        assert engine.core.model.formulation == Formulation(kernel_below_rows=kernel, bf16_from_rows=2)
        compiles = dict(engine.core.compiles)
        greedy = SamplingParams(temperature=0.0)
        for n in (1, 3):  # one row in f32 (or the kernel), then 2 and 4 rows in bf16
            requests = [EngineRequest(f"r{n}{i}", (1, 5, 9 + i), max_tokens=6, sampling=greedy) for i in range(n)]
            threads = [threading.Thread(target=complete, args=(engine, r, 120)) for r in requests]
            [t.start() for t in threads]
            [t.join() for t in threads]
        assert dict(engine.core.compiles) == compiles
        metrics = Metrics()
        metrics.attach("tiny", engine)
        text = metrics.render().decode()
        assert f'jaxserve_matmul_formulation_info{{bf16_from_rows="2",{label}}} 1.0' in text
    finally:
        engine.shutdown()


def test_quantized_activations_serve_every_row_count_or_none(tiny_int8, tmp_path, monkeypatch):
    """Where the block kernel can multiply on quantized activations, `auto` measures them against the
    kernel at every row count first: taken at every row count (and cached so) when not slower by the margin
    at one row and faster by it over all the row counts together; else the other formulations are chosen
    as before, the quantized ones' timings kept beside theirs."""
    monkeypatch.setattr(formulation, "q8_possible", lambda model: True)
    monkeypatch.setattr(formulation, "kernel_possible", lambda model: False)
    rows = (1, 2, 4, 16, 32, 64)  # 4 slots: decode buckets, then the short prefill chunks
    q8 = lambda q8, kernel: ms(10, 5) | {"q8": q8, "kernel": kernel}
    calls: list = []
    wins = timer(calls, {1: q8(10.2, 10), 2: q8(10.5, 10), 4: q8(8, 10), 16: q8(6, 10), 32: q8(5, 10), 64: q8(5, 10)})
    first = choose(tiny_int8, 4, "auto", tmp_path, wins)
    assert calls == [rows] and first.source.startswith("measured")  # a loss inside a total win counts not
    assert first.formulation == CANDIDATES["q8"].formulation == Formulation(EVERY_ROW, None, True)
    again = choose(tiny_int8, 4, "auto", tmp_path, wins)
    assert again.source.startswith("cached") and again.formulation == first.formulation and len(calls) == 1
    slow_alone = timer(calls, {r: q8(10.4 if r == 1 else 5, 10) for r in rows})  # a single stream would lose
    other = choose(tiny_int8, 4, "auto", None, slow_alone)
    assert not other.formulation.q8 and other.bf16_from_rows == 1
    assert {r: t["q8"] for r, t in other.timings.items()} == {r: 10.4 if r == 1 else 5 for r in rows}
    level = timer(calls, {r: q8(9.9, 10) for r in rows})  # no loss, but no win either
    assert not choose(tiny_int8, 4, "auto", None, level).formulation.q8


def test_amx_tiles_serve_where_measured_faster(tiny_int8, tmp_path, monkeypatch):
    """Where the kernels have AMX tiles, `auto` times quantized activations with them and without: they
    serve (and are cached so) where faster by the margin over all the row counts, and then the quantized
    activations are weighed against the kernel at the tiles' timings."""
    monkeypatch.setattr(formulation, "q8_possible", lambda model: True)
    monkeypatch.setattr(formulation, "kernel_possible", lambda model: False)
    monkeypatch.setattr(formulation.kernels, "tiles", lambda isa=None: True)
    rows = (1, 2, 4, 16, 32, 64)
    ms3 = lambda tiles, q8, kernel: ms(10, 5) | {"q8_tiles": tiles, "q8": q8, "kernel": kernel}
    calls: list = []
    faster = timer(calls, {r: ms3(8 if r >= 16 else 9.5, 9.5, 10) for r in rows})
    first = choose(tiny_int8, 4, "auto", tmp_path, faster)
    assert calls == [rows] and first.formulation == Formulation(EVERY_ROW, None, True, True)
    assert choose(tiny_int8, 4, "auto", tmp_path, faster).source.startswith("cached")
    assert choose(tiny_int8, 4, "auto", tmp_path, faster).formulation.tiles and len(calls) == 1
    slower = timer(calls, {r: ms3(9.6 if r >= 16 else 9.5, 9.5, 10) for r in rows})
    assert choose(tiny_int8, 4, "auto", None, slower).formulation == Formulation(EVERY_ROW, None, True, False)
    # a single stream would lose to the kernel (10.4 at one row), with the tiles or without
    lose_alone = timer(calls, {r: ms3(10.4 if r == 1 else 5, 10.4 if r == 1 else 9, 10) for r in rows})
    assert not choose(tiny_int8, 4, "auto", None, lose_alone).formulation.q8
    assert choose(tiny_int8, 4, "q8").formulation.tiles
