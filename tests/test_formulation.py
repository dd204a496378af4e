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
from jaxserve.engine import formulation
from jaxserve.engine.bridge import complete
from jaxserve.engine.build import build_engine
from jaxserve.engine.formulation import CACHE_FILE, Choice, bf16_threshold, cache_key, choose, matmul_step, measure
from jaxserve.engine.types import EngineRequest, SamplingParams
from jaxserve.model.transformer import dot
from jaxserve.sharding import make_mesh

TINY_LLAMA = Path(__file__).parent / "reference" / "hf-tiny" / "llama"


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    out = convert_hf(TINY_LLAMA, tmp_path_factory.mktemp("int8") / "ckpt", progress=False, quantize="int8")
    return load_checkpoint(out, make_mesh(1, 1))


def timer(calls: list, timings: dict):
    """A stand-in for `measure`: records the row counts asked for and answers `timings`."""

    def fake(model, rows):
        calls.append(rows)
        return {r: timings[r] for r in rows}

    return fake


def ms(f32, bf16):
    return {"f32": f32, "bf16": bf16}


def test_bfloat16_from_the_smallest_row_count_it_wins_at_and_above():
    assert bf16_threshold({1: ms(10, 20), 2: ms(10, 9), 4: ms(10, 5)}) == 2
    assert bf16_threshold({1: ms(10, 5), 2: ms(10, 11), 4: ms(10, 5)}) == 4  # a loss at 2 rows keeps 1 and 2 f32
    assert bf16_threshold({1: ms(10, 5), 2: ms(10, 5)}) == 1
    assert bf16_threshold({1: ms(10, 5), 2: ms(10, 9.8)}) is None  # a win inside the 3% margin is no win


def test_dot_switches_by_rows():
    rng = np.random.default_rng(0)
    kernel = rng.integers(-127, 128, (64, 3), dtype=np.int8)
    scale = rng.uniform(0.01, 0.02, (1, 3)).astype(np.float32)
    x = rng.standard_normal((2, 1, 64)).astype(np.float32)
    w = kernel.astype(np.float32) * scale
    exact = np.einsum("btd,dv->btv", x, w)
    one, two = (np.asarray(dot("btd,dv->btv", jnp.asarray(x[:r]), (kernel, scale), 2)) for r in (1, 2))
    np.testing.assert_allclose(one, exact[:1], rtol=1e-6)  # below the threshold: float32
    bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_allclose(two, np.einsum("btd,dv->btv", bf16(x), bf16(w)), rtol=1e-5)  # at it: bfloat16
    assert not np.allclose(two, exact, rtol=1e-6, atol=0)
    floats = np.asarray(dot("btd,dv->btv", jnp.asarray(x), (w, None), 1))
    np.testing.assert_allclose(floats, exact, rtol=1e-6)  # float weights stay float32, whatever the rule


def test_forced_float_weights_and_off_cpu(tiny_int8, tiny, monkeypatch):
    calls: list = []
    fake = timer(calls, {})
    assert choose(tiny_int8, 4, "f32", timer=fake) == Choice(None, "forced")
    assert choose(tiny_int8, 4, "bf16", timer=fake) == Choice(1, "forced")
    assert choose(tiny, 4, "auto", timer=fake) == Choice(None, "float weights")  # float32 stays exact
    with pytest.raises(ValueError, match="int8 weights"):
        choose(tiny, 4, "bf16")
    with pytest.raises(ValueError, match="unknown formulation"):
        choose(tiny_int8, 4, "fast")
    monkeypatch.setattr(formulation.jax, "default_backend", lambda: "tpu")
    assert choose(tiny_int8, 4, "auto", timer=fake) == Choice(1, "platform: tpu")
    assert calls == []  # nothing was measured


def test_the_choice_is_cached_under_its_key(tiny_int8, tmp_path):
    calls: list = []
    fake = timer(calls, {1: ms(10, 12), 2: ms(10, 8), 4: ms(10, 6), 8: ms(10, 5)})
    first = choose(tiny_int8, 4, "auto", tmp_path, fake)
    assert calls == [(4,), (2,), (1,)] and first.bf16_from_rows == 2 and first.source.startswith("measured")
    again = choose(tiny_int8, 4, "auto", tmp_path, fake)
    assert len(calls) == 3  # a restart reads the file
    assert again.source.startswith("cached") and (again.bf16_from_rows, again.timings) == (2, first.timings)
    choose(tiny_int8, 8, "auto", tmp_path, fake)  # other slots: other row buckets, measured
    bf16_weights = dataclasses.replace(tiny_int8, cfg=dataclasses.replace(tiny_int8.cfg, dtype="bfloat16"))
    choose(bf16_weights, 4, "auto", tmp_path, fake)  # another config of the model: measured
    assert calls[3:] == [(8,), (4,), (2,), (1,), (4,), (2,), (1,)]
    entries = json.loads((tmp_path / CACHE_FILE).read_text())
    assert len(entries) == 3 and cache_key(tiny_int8, 4) in entries
    key = cache_key(tiny_int8, 4)
    for part in (formulation.machine(), f"jax {jax.__version__} cpu", tiny_int8.name, "weights int8", "4 slots"):
        assert part in key
    calls.clear()
    slow = timer(calls, {1: ms(10, 5), 2: ms(10, 20), 4: ms(10, 8)})
    assert choose(tiny_int8, 4, "auto", None, slow).bf16_from_rows == 4
    assert calls == [(4,), (2,)]  # below a loss nothing is measured: it could not lower the threshold
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert choose(tiny_int8, 4, "auto", tmp_path, fake).source.startswith("measured")  # a broken file: measure
    assert choose(tiny_int8, 4, "auto", None, fake).source.startswith("measured")  # no cache folder: measure


def test_measure_times_the_models_own_matmuls(tiny_int8):
    timings = measure(tiny_int8, (1, 2), repeats=1)
    assert set(timings) == {1, 2} and all(t["f32"] > 0 and t["bf16"] > 0 for t in timings.values())
    x = jnp.linspace(-1, 1, 2 * tiny_int8.cfg.dim, dtype=jnp.float32).reshape(2, 1, -1)
    f32, bf16 = (np.asarray(matmul_step(tiny_int8, rule)(tiny_int8.params, x)) for rule in (None, 1))
    assert f32.shape == (2, 1, tiny_int8.cfg.vocab_size)
    np.testing.assert_allclose(bf16, f32, atol=0.02 * np.abs(f32).max())


def test_no_recompiles_after_warmup_with_a_mixed_rule(tiny_int8, tmp_path):
    """float32 at one row, bfloat16 from two (as a cached choice): every shape compiles in warm-up, and
    /metrics names the rule."""
    formulation._write(tmp_path / CACHE_FILE, cache_key(tiny_int8, 4), Choice(2, "measured", {1: ms(1, 2)}))
    engine = build_engine(tiny_int8, slots=4, max_context=128, formulation_cache=tmp_path)
    try:
        assert engine.core.cfg.bf16_from_rows == 2
        compiles = dict(engine.core.compiles)
        greedy = SamplingParams(temperature=0.0)
        for n in (1, 3):  # one row in f32, then 2 and 4 rows in bf16
            requests = [EngineRequest(f"r{n}{i}", (1, 5, 9 + i), max_tokens=6, sampling=greedy) for i in range(n)]
            threads = [threading.Thread(target=complete, args=(engine, r, 120)) for r in requests]
            [t.start() for t in threads]
            [t.join() for t in threads]
        assert dict(engine.core.compiles) == compiles
        metrics = Metrics()
        metrics.attach("tiny", engine)
        text = metrics.render().decode()
        assert 'jaxserve_matmul_formulation_info{bf16_from_rows="2",formulation="f32<2<=bf16"} 1.0' in text
    finally:
        engine.shutdown()
