"""The attention kernels behind the seam (jaxserve.model.attention_kernels) against the plain path, on CPU:
jaxserve's TPU kernel in TPU interpret mode (tests named `interpret`) on the attention shapes of the tiny
model, SmolLM2 and Gemma 3, with random K/V and queries (the shapes are the point), over page tables with
shared and partial pages; the whole forward with the kernel against the plain one; and which attention
`choose` takes on each backend."""

import dataclasses
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model import KVCache, ModelConfig, Transformer, init_params, kv_cache_for
from jaxserve.model.attention_kernels import KernelKVCache, choose
from jaxserve.model.transformer import paged_attention

S = 16  # positions per page
P = 12  # pages in the pool
WINDOW = 64  # positions attention reads: 4 pages per sequence

# (query heads, KV heads, head dim, query scale) of each model's attention
SHAPES = {
    "tiny": (8, 2, 16, None),
    "smollm2": (9, 3, 64, None),
    "gemma3": (4, 1, 256, 256**-0.5),
}

# three sequences: the first two share a prefix of two full pages; every last page is partial
TABLE = np.array([[3, 7, 1, P], [3, 7, 5, 9], [10, 0, P, P]], np.int32)
LENGTHS = np.array([45, 58, 20], np.int32)
SHARED = np.array([0, 2 * S, 0], np.int32)  # the second sequence writes from its first page of its own


def config(name: str, dtype: str = "float32", **kw) -> ModelConfig:
    n, k, h, scale = SHAPES[name]
    return ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=n, n_kv_heads=k, head_dim=h, mlp_dim=64,
        dtype=dtype, query_scale=scale, sliding_window=20, local_layers=(1,), **kw,
    )  # fmt: skip


def filled(c: ModelConfig, seed: int = 0):
    """The same random K/V of the three sequences (every position before its length, both layers) written
    into a plain pool and into the kernel's, each by its own `write`."""
    rng = np.random.default_rng(seed)
    caches = [KVCache.zeros(c, P, S), KernelKVCache.zeros(c, P, S)]
    positions = np.broadcast_to(np.arange(WINDOW, dtype=np.int32), (3, WINDOW))
    for layer in range(c.n_layers):
        k, v = (jnp.asarray(rng.normal(size=(3, WINDOW, c.n_kv_heads, c.head_dim)), c.dtype) for _ in range(2))
        # the shared pages hold the first sequence's prefix: the second one's K/V there are the same
        k, v = (x.at[1, : SHARED[1]].set(x[0, : SHARED[1]]) for x in (k, v))
        # positions at or past a sequence's length are never written (the cache keeps the zeros there)
        written = np.where(positions < LENGTHS[:, None], positions, WINDOW)
        caches = [cache.write(layer, TABLE, written, k, v, SHARED) for cache in caches]
    return caches


def both(c: ModelConfig, caches, q, layer, table, positions, local):
    """The plain path's and the kernel's attention for the same queries."""
    plain = paged_attention(c, q, caches[0], layer, table, positions, WINDOW, local)
    kernel_cfg = dataclasses.replace(c, attention="tpu_kernel")
    kernel = paged_attention(kernel_cfg, q, caches[1], layer, table, positions, WINDOW, local)
    return np.asarray(plain, np.float32), np.asarray(kernel, np.float32)


TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


@pytest.mark.parametrize("name", list(SHAPES))
def test_interpret_prefill_chunks_and_decode_rows_equal_the_plain_path(name):
    """Each sequence's last T positions as a prefill chunk (T = 8), then as decode rows (T = 1, with an idle
    row that has no pages), on a global layer and on a local (sliding-window) one."""
    c = config(name)
    caches = filled(c)
    rng = np.random.default_rng(1)
    for T in (8, 1):
        positions = LENGTHS[:, None] - T + np.arange(T, dtype=np.int32)
        table = TABLE
        if T == 1:  # an idle decode slot: no pages, position 0
            positions, table = np.vstack([positions, [[0]]]), np.vstack([TABLE, np.full((1, 4), P, np.int32)])
        q = jnp.asarray(rng.normal(size=(len(positions), T, c.n_heads, c.head_dim)), c.dtype)
        for layer, local in ((0, False), (1, True)):
            plain, kernel = both(c, caches, q, jnp.int32(layer), table, jnp.asarray(positions), jnp.bool_(local))
            np.testing.assert_allclose(kernel[:3], plain[:3], atol=TOLERANCE[c.dtype], err_msg=f"T={T} {layer=}")
            assert np.isfinite(kernel).all()


def test_interpret_bfloat16_pool_equals_the_plain_path():
    """SmolLM2's shape with bfloat16 K/V and queries, as served on an accelerator."""
    c = config("smollm2", "bfloat16")
    caches = filled(c)
    positions = LENGTHS[:, None] - 4 + np.arange(4, dtype=np.int32)
    q = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, c.n_heads, c.head_dim)), c.dtype)
    plain, kernel = both(c, caches, q, jnp.int32(1), TABLE, jnp.asarray(positions), jnp.bool_(True))
    np.testing.assert_allclose(kernel, plain, atol=TOLERANCE["bfloat16"])


def test_interpret_forward_with_the_kernel_equals_the_plain_forward():
    """The whole model (tiny attention shape, random weights, one local layer) with the kernel: a prefill of
    two rows then two decode steps give the plain forward's logits; the local/global choice is the
    layer scan's traced index, the pool the scan's carry."""
    c = config("tiny")
    params = init_params(c)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, c.vocab_size, (2, 40), dtype=np.int32)
    table = TABLE[:2]
    outputs = []
    for cfg in (c, dataclasses.replace(c, attention="tpu_kernel")):
        model, cache = Transformer(cfg), kv_cache_for(cfg).zeros(cfg, P, S)
        positions = np.broadcast_to(np.arange(38, dtype=np.int32), (2, 38))
        logits, cache = model.apply(params, tokens[:, :38], positions, cache, table, WINDOW)
        steps = [logits[:, -1]]
        for t in (38, 39):
            logits, cache = model.apply(
                params, tokens[:, t : t + 1], np.full((2, 1), t, np.int32), cache, table, WINDOW
            )
            steps.append(logits[:, 0])
        outputs.append(np.stack(steps))
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-4)


def test_choose_takes_the_kernel_on_a_tpu_only_where_it_takes_the_shapes(caplog):
    c = config("smollm2")
    one, four = types.SimpleNamespace(size=1), types.SimpleNamespace(size=4)
    with caplog.at_level(logging.INFO, logger="jaxserve.model.attention_kernels"):
        assert choose(c, one, 128, backend="tpu").attention == "tpu_kernel"
        assert choose(c, one, 128, backend="gpu").attention == "plain"
        assert choose(c, one, 100, backend="tpu").attention == "plain"
        assert "page size 100 is not a multiple of 16" in caplog.text
        assert choose(c, four, 128, backend="tpu").attention == "plain"
        assert "a mesh of 4 devices" in caplog.text
    assert choose(c, one, 128).attention == ("tpu_kernel" if jax.default_backend() == "tpu" else "plain")
