"""--kv-cache-dtype: the KV page pool in bfloat16 under float32 activations. The pool holds bfloat16 (as its
bits: see kv_cache.STORED) and a byte budget holds twice the pages; greedy decoding gives the float32
pool's tokens, with logprobs within the rounding's reach; the flag is parsed on serve, generate and batch,
and a bad value is refused naming it; the compiled steps' keys tell the two pools apart (auto and the
model's own dtype are one)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from served import greedy_decode

from jaxserve.device.build import build_runner
from jaxserve.device.executables import key_text
from jaxserve.device.runner import JaxRunner
from jaxserve.device.warmup import variants
from jaxserve.model import KVCache

PROMPTS = ("Call me Ishmael.", "It was the best of", "The quick brown fox", "Once upon a time")


def with_kv(model, choice: str):
    return dataclasses.replace(model, cfg=model.cfg.with_kv_dtype(choice))


def test_a_bfloat16_pool_holds_bfloat16_pages_and_twice_as_many_in_the_same_bytes(tiny):
    per_page = KVCache.bytes_per_token(tiny.cfg) * 128  # float32
    budget = 8 * per_page  # under the cap of every slot at full context (8 slots x 4 pages)
    cores = {
        kv: build_runner(tiny, slots=8, max_context=512, kv_cache_memory=budget, warmup=False, kv_cache_dtype=kv)
        for kv in ("auto", "bfloat16")
    }
    pools = {kv: core.state.cache for kv, core in cores.items()}
    assert pools["auto"].dtype == pools["auto"].k.dtype == pools["auto"].v.dtype == jnp.float32
    # bfloat16 held as its bits (see kv_cache.STORED): two bytes an entry, read back as bfloat16
    assert pools["bfloat16"].dtype == jnp.bfloat16
    assert pools["bfloat16"].k.dtype == pools["bfloat16"].v.dtype == jnp.uint16
    assert KVCache.bytes_per_token(cores["bfloat16"].cfg) * 2 == KVCache.bytes_per_token(tiny.cfg)
    assert (cores["auto"].pages, cores["bfloat16"].pages) == (8, 16)
    assert cores["bfloat16"].kv_bytes == cores["auto"].kv_bytes == budget


def test_a_bfloat16_pool_reads_back_what_it_was_given_rounded_to_bfloat16(tiny):
    cfg = tiny.cfg.with_kv_dtype("bfloat16")
    cache = KVCache.zeros(cfg, 4, 16)
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.normal(size=(2, 3, cfg.n_kv_heads, cfg.head_dim)), jnp.float32) for _ in range(2))
    table = np.array([[2], [0]], np.int32)
    positions = np.array([[0, 1, 2], [5, 6, 7]], np.int32)
    cache = cache.write(1, table, positions, k, v)
    keys, values = cache.read(1, np.array([2, 0], np.int32))  # [b, K, H, S], [b, K, S, H]
    assert keys.dtype == values.dtype == jnp.bfloat16
    for row, at in enumerate(positions):
        np.testing.assert_array_equal(keys[row][:, :, at].transpose(2, 0, 1), k[row].astype(jnp.bfloat16))
        np.testing.assert_array_equal(values[row][:, at].transpose(1, 0, 2), v[row].astype(jnp.bfloat16))
    copied = cache.copy_page(2, 3).read(1, np.array([3], np.int32))
    np.testing.assert_array_equal(copied[0][0], keys[0])


def test_greedy_tokens_over_a_bfloat16_pool_are_the_float32_pools(tiny):
    """Same tokens, step by step, for four prompts over 24 steps, prefilled in chunks of 5 (pages written
    by prefill and by decode both read back). Logprobs: bfloat16 keeps 8 significant bits, so each key and
    value read is off by at most 2^-9 (0.2%) of itself, and the logits it feeds move by about that share:
    measured on this model, a chosen token's logprob moved 0.011 nats at most over these 96 steps, 0.0005
    on average, while the float32 run's narrowest top-1/top-2 margin was 0.094 (so equal tokens are what
    the rounding leaves room for, not luck). The bounds, 0.05 at most (a 5% change in that token's
    probability) and 0.005 on average, keep about 5x and 10x of room for other CPUs' float32 sums."""
    prompts = [tiny.tokenizer.encode(p) for p in PROMPTS]
    runs = {
        kv: greedy_decode(JaxRunner(with_kv(tiny, kv), slots=4, cache_len=128, eos_id=None), prompts, 24, chunk=5)
        for kv in ("float32", "bfloat16")
    }
    gaps = []
    for (tokens32, lps32, *_), (tokens16, lps16, *_) in zip(runs["float32"], runs["bfloat16"]):
        np.testing.assert_array_equal(tokens16, tokens32)
        gaps.append(np.abs(lps16 - lps32))
    gaps = np.concatenate(gaps)
    assert 0 < gaps.max() <= 0.05  # non-zero: the pages really were rounded
    assert gaps.mean() <= 0.005


def test_the_flag_is_parsed_on_serve_generate_and_batch():
    from jaxserve.cli import build_parser
    from jaxserve.engine_args import EngineArgs

    parse = build_parser().parse_args
    assert EngineArgs.from_args(parse(["serve"])).kv_cache_dtype == "auto"
    serve = EngineArgs.from_args(parse(["serve", "--kv-cache-dtype", "bfloat16"]))
    assert serve.runner_settings(None)["kv_cache_dtype"] == "bfloat16"
    assert parse(["generate", "hi", "--kv-cache-dtype", "float32"]).kv_cache_dtype == "float32"
    assert parse(["batch", "in.jsonl", "out.jsonl", "--kv-cache-dtype", "bfloat16"]).kv_cache_dtype == "bfloat16"


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["batch", "in.jsonl", "out.jsonl"]])
def test_a_bad_value_is_refused_naming_the_flag(command, capsys):
    from jaxserve.cli import build_parser

    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([*command, "--kv-cache-dtype", "fp8"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-cache-dtype" in err and "'fp8'" in err and "bfloat16" in err


def test_the_compiled_steps_keys_tell_the_pools_apart(tiny):
    """The pool's dtype is in the config each key holds (and in its arguments' dtypes); asking for the
    model's own dtype is the default config: the same keys, the same stored executables."""

    def keys(model):
        core = JaxRunner(model, slots=2, cache_len=128, eos_id=None)
        return {name: key_text(core.spec, v) for name, v in variants(core).items()}

    auto, same, bf16 = keys(tiny), keys(with_kv(tiny, "float32")), keys(with_kv(tiny, "bfloat16"))
    assert with_kv(tiny, "float32").cfg == tiny.cfg and same == auto
    assert auto.keys() == bf16.keys() and all(auto[name] != bf16[name] for name in auto)


def test_the_choice_is_not_saved_with_the_checkpoint(tiny):
    assert "kv_dtype" not in tiny.cfg.with_kv_dtype("bfloat16").to_json()
