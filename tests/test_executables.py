"""The warm path: step executables saved by one start are loaded by the next instead of compiled, give
the same outputs as compiled (and as the plain jitted steps), and a changed key or a damaged entry
compiles afresh. An executable jax's persistent cache handed over is never stored (XLA:CPU serializes it
again without its object code: loaded, it failed to run). A background warm-up serves at once through
the shapes every call can fall back to."""

import dataclasses
import json
import logging
import subprocess
import sys

import pytest
from jax.experimental import serialize_executable

from jaxserve.api.metrics import Metrics
from jaxserve.chat_template import end_of_turn_ids
from jaxserve.device import executables
from jaxserve.device.build import build_engine
from jaxserve.device.executables import ExecutableStore, complete, key_text, pack, unpack
from jaxserve.device.runner import JaxRunner
from jaxserve.device.warmup import essential, variants, warm
from jaxserve.engine import bridge
from jaxserve.engine.types import Delta, EngineRequest, SamplingParams
from jaxserve.model import attention_kernels
from jaxserve.model.quant import Formulation

SLOTS, CONTEXT = 2, 128  # few variants: one window, two row buckets


def generate(engine, n=2):
    """Greedy and seeded completions of two prompts at once: token ids and logprobs of each."""
    requests = [
        EngineRequest("greedy", (1, 5, 9, 13), max_tokens=8, sampling=SamplingParams(temperature=0.0)),
        EngineRequest("seeded", (2, 6, 10), max_tokens=8, seed=7, sampling=SamplingParams(temperature=0.8)),
    ][:n]
    out = {}
    for r in requests:
        deltas = [d for d in bridge.stream(engine, r) if isinstance(d, Delta)]
        out[r.request_id] = [(t.token_id, round(t.logprob, 5)) for d in deltas for t in d.tokens]
    return out


def engine(tiny, store, background=False):
    e = build_engine(tiny, slots=SLOTS, max_context=CONTEXT, warmup=False)
    e.core.report = warm(e.core, store, background=background)
    return e


@pytest.fixture(scope="module")
def stored(tiny, tmp_path_factory):
    """A store filled by a cold start, and that start's outputs."""
    store = ExecutableStore(tmp_path_factory.mktemp("executables"))
    cold = engine(tiny, store)
    try:
        assert cold.core.report.loaded == 0 and cold.core.report.compiled > 0
        yield store, cold.core.report.compiled, generate(cold)
    finally:
        cold.shutdown()


def test_a_warm_start_loads_every_variant_and_traces_nothing(tiny, stored):
    store, count, outputs = stored
    assert len(list(store.folder.glob("*.exe"))) == count
    warm = engine(tiny, store)
    try:
        assert (warm.core.report.loaded, warm.core.report.compiled) == (count, 0)
        assert dict(warm.core.compiles) == {}  # nothing traced: the loaded executables serve
        assert generate(warm) == outputs
        assert dict(warm.core.compiles) == {}  # and no request reached a shape warm-up missed
    finally:
        warm.shutdown()


def test_a_warm_background_start_loads_the_fallbacks_first_then_the_rest(tiny, stored):
    store, count, outputs = stored
    warm = engine(tiny, store, background=True)
    try:
        assert 0 < warm.core.report.loaded < count and warm.core.report.compiled == 0
        warm.core.background.join(timeout=120)
        assert not warm.core._pending and dict(warm.core.compiles) == {}  # the rest loaded too, nothing traced
        assert generate(warm) == outputs
    finally:
        warm.shutdown()


def test_outputs_equal_the_plain_jitted_steps(tiny, stored):
    _, _, outputs = stored
    plain = build_engine(tiny, slots=SLOTS, max_context=CONTEXT, warmup=False)  # jit dispatch as shapes come
    try:
        assert generate(plain) == outputs
    finally:
        plain.shutdown()


def test_a_changed_key_compiles_afresh(tiny, stored):
    """Another end id or another matmul formulation changes the StepSpec: every variant's key differs,
    nothing stale is loaded."""
    store, count, _ = stored
    tok = tiny.tokenizer
    ends = tok.eos_ids + end_of_turn_ids(tok)  # as build_engine has them, and its attention
    served = dataclasses.replace(tiny, cfg=attention_kernels.choose(tiny.cfg, tiny.mesh, CONTEXT))
    same = JaxRunner(served, slots=SLOTS, cache_len=CONTEXT, eos_id=tok.eos_id, eos_ids=ends)
    assert sum(store.path(key_text(same.spec, v)).exists() for v in variants(same).values()) == count
    formulated = dataclasses.replace(served, formulation=Formulation(bf16_from_rows=1))
    for core in (
        JaxRunner(served, slots=SLOTS, cache_len=CONTEXT, eos_id=tok.eos_id, eos_ids=(*ends, 3)),
        JaxRunner(formulated, slots=SLOTS, cache_len=CONTEXT, eos_id=tok.eos_id, eos_ids=ends),
    ):
        assert not any(store.path(key_text(core.spec, v)).exists() for v in variants(core).values())


def test_another_host_cpu_keys_every_entry_afresh(tiny, monkeypatch):
    """XLA:CPU compiles for the host's features: a cache folder shared with another kind of CPU misses."""
    core = JaxRunner(tiny, slots=SLOTS, cache_len=CONTEXT, eos_id=None)
    variant = next(iter(variants(core).values()))
    here = key_text(core.spec, variant)
    monkeypatch.setattr(executables, "host_cpu", lambda: "another CPU features 0123456789abcdef")
    executables.environment.cache_clear()
    try:
        assert key_text(core.spec, variant) != here
    finally:
        executables.environment.cache_clear()  # recomputed with this host's CPU once the patch is undone


def test_a_damaged_or_mismatched_entry_is_compiled_not_used(tiny, stored, caplog, tmp_path):
    store, count, outputs = stored
    copy = ExecutableStore(tmp_path)
    files = sorted(store.folder.glob("*.exe"))
    for f in files:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / files[0].name).write_bytes(b"not an executable")
    (tmp_path / files[1].name).write_bytes(files[2].read_bytes())  # another key's entry under this name
    with caplog.at_level(logging.WARNING, logger="jaxserve.device.executables"):
        e = engine(tiny, copy)
    try:
        assert (e.core.report.loaded, e.core.report.compiled) == (count - 2, 2)
        assert "failed to load" in caplog.text and "stored for another key" in caplog.text
        assert generate(e) == outputs
    finally:
        e.shutdown()


def test_flipped_bytes_inside_entries_are_caught_by_their_checksum_and_replaced(tiny, stored, caplog, tmp_path):
    """Three bytes flipped inside a stored executable (a bad disk, a torn copy) once reached XLA's
    deserializer, which crashed the server at every start; the checksum catches them before it."""
    store, count, outputs = stored
    copy = ExecutableStore(tmp_path)
    files = sorted(store.folder.glob("*.exe"))
    for i, f in enumerate(files):
        data = bytearray(f.read_bytes())
        if i < 2:  # the middle of the entry: inside the serialized executable, past the header and key
            for at in (len(data) // 2, len(data) // 2 + 1, len(data) // 2 + 97):
                data[at] ^= 0x5A
        (tmp_path / f.name).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="jaxserve.device.executables"):
        e = engine(tiny, copy)
    try:
        assert (e.core.report.loaded, e.core.report.compiled) == (count - 2, 2)
        assert caplog.text.count("checksum does not match") == 2
        assert generate(e) == outputs
    finally:
        e.shutdown()
    again = engine(tiny, copy)  # the damaged entries were replaced by good ones
    try:
        assert (again.core.report.loaded, again.core.report.compiled) == (count, 0)
    finally:
        again.shutdown()


def test_a_background_warmup_serves_through_the_widest_shapes_then_every_one(tiny, stored):
    _, count, outputs = stored
    e = engine(tiny, None, background=True)  # no store: everything compiles
    try:
        assert e.core.report.compiled < count and e.core.background is not None
        assert e.core.pending_variants <= count - e.core.report.compiled  # what is left (or less by now)
        early = generate(e)  # while (or after) the rest compile: wider shapes, the same tokens
        assert {k: [t for t, _ in v] for k, v in early.items()} == {k: [t for t, _ in v] for k, v in outputs.items()}
        e.core.background.join(timeout=600)
        assert not e.core.background.is_alive() and e.core.pending_variants == 0
        metrics = Metrics()
        metrics.attach("tiny", e)
        assert "jaxserve_step_variants_pending 0.0" in metrics.render().decode()  # what bench_serving waits for
        compiles = dict(e.core.compiles)
        assert generate(e) == outputs
        assert dict(e.core.compiles) == compiles
    finally:
        e.shutdown()


# one start of the engine in its own process, jax's persistent cache in argv[1], the store in argv[2] ('-':
# none), the model in argv[3]: prints how many variants it compiled and how many came from jax's cache
START = f"""
import json, sys
from pathlib import Path
from jaxserve.checkpoint import load_checkpoint
from jaxserve.device.build import build_engine, enable_compilation_cache
from jaxserve.device.executables import ExecutableStore
from jaxserve.device.warmup import warm
from jaxserve.sharding import make_mesh
enable_compilation_cache(Path(sys.argv[1]))
model = load_checkpoint(Path(sys.argv[3]), make_mesh(1, 1))
e = build_engine(model, slots={SLOTS}, max_context={CONTEXT}, warmup=False)
report = warm(e.core, None if sys.argv[2] == "-" else ExecutableStore(Path(sys.argv[2])))
e.shutdown()
print(json.dumps([report.compiled, report.cache_hits]))
"""


def start(xla, store, tiny_dir) -> list[int]:
    argv = [sys.executable, "-c", START, str(xla), str(store or "-"), str(tiny_dir)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_executables_from_jax_persistent_cache_are_not_stored(tiny, tiny_dir, stored, tmp_path):
    """What CI hit: a start whose compiles jax's persistent cache answered stored them, and the next start
    loaded them and failed to run them (NOT_FOUND: Function add_select_fusion not found)."""
    _, count, outputs = stored
    xla, folder = tmp_path / "xla", tmp_path / "executables"
    first = start(xla, None, tiny_dir)  # fills jax's cache
    second = start(xla, folder, tiny_dir)  # with the store: every compile a cache hit
    e = engine(tiny, ExecutableStore(folder))  # a later start serves what the store holds
    try:
        assert generate(e) == outputs
        assert (first, second) == ([count, 0], [count, count])
        assert (e.core.report.loaded, e.core.report.compiled, e.core.report.cache_hits) == (0, count, 0)
    finally:
        e.shutdown()
    assert len(list(folder.glob("*.exe"))) == count  # this start's own compiles are stored


def reserialized(entry: bytes) -> bytes:
    """An entry as a persistent-cache hit left it: the executable loaded, then serialized again."""
    key, blob, in_tree, out_tree = unpack(entry)
    loaded = serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
    return pack(key, serialize_executable.serialize(loaded)[0], in_tree, out_tree)


def test_an_executable_without_object_code_is_neither_saved_nor_loaded(tiny, stored, caplog, tmp_path):
    store, count, outputs = stored
    files = sorted(store.folder.glob("*.exe"))
    copy = ExecutableStore(tmp_path)
    for f in files:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    broken = [tmp_path / f.name for f in files[:3]]
    for f in broken:
        f.write_bytes(reserialized(f.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="jaxserve.device.executables"):
        e = engine(tiny, copy)
    try:
        assert generate(e) == outputs
        assert (e.core.report.loaded, e.core.report.compiled) == (count - 3, 3)
        assert caplog.text.count("lacks its object code") == 3
    finally:
        e.shutdown()
    for f in broken:  # replaced by the fresh compiles' complete entries
        assert complete(unpack(f.read_bytes())[1], "cpu")

    key, blob, in_tree, out_tree = unpack(files[0].read_bytes())
    loaded = serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
    with caplog.at_level(logging.WARNING, logger="jaxserve.device.executables"):
        copy.save("another key", loaded, "cpu")
    assert not copy.path("another key").exists() and "lacks the object code" in caplog.text


def test_while_warming_a_decode_step_runs_at_rows_whose_sampling_half_is_ready(tiny):
    """Only the sampling halves of the essential decode steps (1 row, every slot) are compiled before a
    background warm-up returns; until the others are, forward takes rows whose sampling half is ready."""
    core = JaxRunner(tiny, slots=4, cache_len=CONTEXT, eos_id=None)
    V = core.vocab_size
    assert [r for r in core.row_buckets if essential(core, ("sample_step", (), (r, V)))] == [1, 4]
    core._pending = {("sample_step", (), (2, V))}
    ran = []
    core._call = lambda fn, statics, *args: ran.append((fn.__name__, statics)) or (core.state, None)
    core.forward(core.empty_table(), max_position=0, max_slot=1)  # 2 rows, whose sampling half is pending
    core._pending = set()
    core.forward(core.empty_table(), max_position=0, max_slot=1)
    assert ran == [("forward", {"window": CONTEXT, "rows": 4}), ("forward", {"window": CONTEXT, "rows": 2})]
