"""The attention kernels behind the seam (jaxserve.model.attention_kernels) against the plain path, on CPU
(tests named `interpret`): jaxserve's TPU kernel in TPU interpret mode and jax's GPU kernel with
interpret=True, on the attention shapes of the tiny model, SmolLM2 and Gemma 3, with random K/V and
queries (the shapes are the point), over page tables with shared and partial pages; the whole forward
with each kernel against the plain one; and which attention `choose` takes on each backend.

jaxserve's CPU kernel (tests named `cpu_kernel`, where jaxserve.kernels are built) also against a NumPy
reference over a random pool on shapes of its own (pages of two 16-position chunks, three query heads a KV
head, rows whose last page is partial, shared pages, "no page" entries, a sliding window that cuts pages),
and through the served steps, which must equal the plain full pass."""

import dataclasses
import logging
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from served import assert_served_steps_equal_full_pass

from jaxserve import kernels
from jaxserve.checkpoint import convert_hf, load_checkpoint
from jaxserve.model import KVCache, ModelConfig, Transformer, init_params, kv_cache_for
from jaxserve.model.attention_kernels import LAYOUTS, choose
from jaxserve.model.transformer import paged_attention
from jaxserve.sharding import make_mesh

built = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler or no CPU backend here")

S = 16  # positions per page
P = 12  # pages in the pool
WINDOW = 64  # positions attention reads: 4 pages per sequence

# (query heads, KV heads, head dim, query scale, dtype) of each model's attention; SmolLM2 in bfloat16, as an
# accelerator serves it, Gemma 3 with its sliding-window layers (layer 1 here); the tiny model's also over a
# bfloat16 pool (--kv-cache-dtype bfloat16): every path reads the same rounded pages, in float32
SHAPES = {
    "tiny": (8, 2, 16, None, "float32"),
    "tiny_bf16_pool": (8, 2, 16, None, "float32"),
    "smollm2": (9, 3, 64, None, "bfloat16"),
    "gemma3": (4, 1, 256, 256**-0.5, "float32"),
}

# three sequences: the first two share a prefix of two full pages; every last page is partial
TABLE = np.array([[3, 7, 1, P], [3, 7, 5, 9], [10, 0, P, P]], np.int32)
LENGTHS = np.array([45, 58, 20], np.int32)
SHARED = np.array([0, 2 * S, 0], np.int32)  # the second sequence writes from its first page of its own


def config(name: str) -> ModelConfig:
    n, k, h, scale, dtype = SHAPES[name]
    local = dict(sliding_window=20, local_layers=(1,)) if name == "gemma3" else {}
    return ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=n, n_kv_heads=k, head_dim=h, mlp_dim=64,
        dtype=dtype, query_scale=scale, kv_dtype="bfloat16" if name.endswith("bf16_pool") else None, **local,
    )  # fmt: skip


def filled(c: ModelConfig, attention: str, seed: int = 0):
    """The same random K/V of the three sequences (every position before its length, both layers) written
    into a plain pool and into the `attention` kernel's, each by its own `write`."""
    rng = np.random.default_rng(seed)
    caches = [KVCache.zeros(c, P, S), LAYOUTS[attention].zeros(c, P, S)]
    positions = np.broadcast_to(np.arange(WINDOW, dtype=np.int32), (3, WINDOW))
    for layer in range(c.n_layers):
        k, v = (jnp.asarray(rng.normal(size=(3, WINDOW, c.n_kv_heads, c.head_dim)), c.dtype) for _ in range(2))
        # the shared pages hold the first sequence's prefix: the second one's K/V there are the same
        k, v = (x.at[1, : SHARED[1]].set(x[0, : SHARED[1]]) for x in (k, v))
        # positions at or past a sequence's length are never written (the cache keeps the zeros there)
        written = np.where(positions < LENGTHS[:, None], positions, WINDOW)
        caches = [cache.write(layer, TABLE, written, k, v, SHARED) for cache in caches]
    return caches


def both(c: ModelConfig, attention: str, caches, q, layer, table, positions, local):
    """The plain path's and the `attention` kernel's attention for the same queries."""
    plain = paged_attention(c, q, caches[0], layer, table, positions, WINDOW, local)
    kernel_cfg = dataclasses.replace(c, attention=attention)
    kernel = paged_attention(kernel_cfg, q, caches[1], layer, table, positions, WINDOW, local)
    return np.asarray(plain, np.float32), np.asarray(kernel, np.float32)


TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


def rows(T: int):
    """Each sequence's last T positions (decode rows, T = 1, with an idle row that has no pages): positions
    and page tables."""
    positions = LENGTHS[:, None] - T + np.arange(T, dtype=np.int32)
    if T > 1:
        return positions, TABLE
    return np.vstack([positions, [[0]]]), np.vstack([TABLE, np.full((1, 4), P, np.int32)])


def check(name: str, attention: str, cases):
    """For each (T, layer) of `cases`: random queries at each sequence's last T positions (decode rows,
    T = 1, with an idle row that has no pages) give the plain path's attention (the idle row: a finite
    one)."""
    c = config(name)
    caches = filled(c, attention)
    # the plain pool may hold a dtype as its bits (kv_cache.STORED): two bytes an entry either way
    assert all(leaf.dtype.itemsize == jnp.dtype(c.cache_dtype).itemsize for leaf in jax.tree.leaves(caches))
    rng = np.random.default_rng(1)
    for T, layer in cases:
        positions, table = rows(T)
        q = jnp.asarray(rng.normal(size=(len(positions), T, c.n_heads, c.head_dim)), c.dtype)
        local = jnp.bool_(layer in c.local_layers)
        plain, kernel = both(c, attention, caches, q, jnp.int32(layer), table, jnp.asarray(positions), local)
        np.testing.assert_allclose(kernel[:3], plain[:3], atol=TOLERANCE[c.dtype], err_msg=f"T={T} {layer=}")
        assert np.isfinite(kernel).all()


@pytest.mark.parametrize("name", list(SHAPES))
def test_interpret_tpu_kernel_prefill_chunks_and_decode_rows_equal_the_plain_path(name):
    """A prefill chunk (T = 8) and decode rows, on the pool's second layer (Gemma 3's: a local one) and on
    Gemma 3's first (global)."""
    check(name, "tpu_kernel", [(8, 1), (1, 1)] + ([(1, 0)] if name == "gemma3" else []))


@pytest.mark.parametrize("name", [name for name in SHAPES if name != "tiny_bf16_pool"])  # choose refuses it
def test_interpret_gpu_kernel_decode_rows_equal_the_plain_path(name):
    """jax's GPU kernel on decode rows of a global layer; on Gemma 3's local layer and on a prefill chunk
    the seam takes the plain path over the GPU layout's pool, equal too."""
    check(name, "gpu_kernel", [(1, 1), (8, 1)] + ([(1, 0)] if name == "gemma3" else []))


@built
@pytest.mark.parametrize("name", list(SHAPES))
def test_cpu_kernel_prefill_chunks_and_decode_rows_equal_the_plain_path(name):
    """Prefill chunks and decode rows on both layers (Gemma 3's second: local); the idle row too, which
    reads the pool's last page as the plain path's clipped gather does."""
    check(name, "cpu_kernel", [(8, 1), (1, 1), (8, 0), (1, 0)])


def numpy_attention(q, k, v, table, positions, scale: float, sliding: int | None):
    """The reference: q [B, T, N, H] float64 over one layer's pages k [P, K, H, S], v [P, K, S, H], each
    row's window gathered whole (a table entry past the pool: the last page), masked (causal; within the
    last `sliding` positions if not None) and softmaxed at once -> [B, T, N, H]."""
    B, T, N, H = q.shape
    P, K, _, S = k.shape
    G = N // K
    pages = np.clip(table, 0, P - 1)  # [B, C]
    keys = k[pages].transpose(0, 2, 3, 1, 4).reshape(B, K, H, -1)  # [B, C, K, H, S] -> [B, K, H, C * S]
    values = v[pages].transpose(0, 2, 1, 3, 4).reshape(B, K, -1, H)  # [B, C, K, S, H] -> [B, K, C * S, H]
    key_pos = np.arange(keys.shape[-1])
    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(T):
            visible = key_pos <= positions[b, t]
            if sliding is not None:
                visible &= key_pos > positions[b, t] - sliding
            for n in range(N):
                scores = np.where(visible, q[b, t, n] @ keys[b, n // G] * scale, -np.inf)
                p = np.exp(scores - scores.max())
                out[b, t, n] = p @ values[b, n // G] / p.sum()
    return out


# The CPU kernel's own case: pages of 32 positions (two chunks of 16), a window of 4 pages, 7 pages in the
# pool; three query heads a KV head. Rows: one ending in its last page's middle, one sharing the first's
# first page with "no page" (P) entries past its position, one within its first page (or two, with a long
# chunk), an idle one with no pages, and one ending at the window's last position.
CPU_S, CPU_P, CPU_WINDOW, CPU_SLIDING = 32, 7, 128, 20
CPU_TABLE = np.array([[0, 1, 2, 3], [0, 4, CPU_P, CPU_P], [5, 3, CPU_P, CPU_P], [CPU_P] * 4, [6, 2, 1, 0]], np.int32)


def cpu_case(T: int):
    """Each row's last T positions (see CPU_TABLE): [5, T]."""
    ends = np.array([100, 45, max(5, T - 1), T - 1, CPU_WINDOW - 1])
    return ends[:, None] - T + 1 + np.arange(T, dtype=np.int32)


@built
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [1, 6, 40])  # decode rows, a prefill chunk, a chunk of 120 query rows a head
def test_cpu_kernel_equals_a_numpy_reference_and_the_plain_path(T, kv_dtype):
    """A random pool (stale entries past every row's position included: the mask hides them), random
    queries, a global and a local layer (a sliding window of 20 that starts mid-chunk): the kernel gives
    the NumPy reference's attention over the same (rounded) pages, and the plain path's."""
    c = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=32, mlp_dim=64,
        sliding_window=CPU_SLIDING, local_layers=(1,), kv_dtype=kv_dtype,
    )  # fmt: skip
    rng = np.random.default_rng(T)
    shapes = KVCache.shape_dtype(c, CPU_P, CPU_S)
    k, v = (jnp.asarray(rng.normal(size=x.shape), jnp.float32).astype(c.cache_dtype) for x in (shapes.k, shapes.v))
    bits = lambda x: x if x.dtype == jnp.float32 else jax.lax.bitcast_convert_type(x, jnp.uint16)
    cache = KVCache(k=bits(k), v=bits(v))  # as the pool holds it (kv_cache.STORED)
    assert cache.k.dtype == shapes.k.dtype
    positions = cpu_case(T)
    q = rng.normal(size=(len(positions), T, c.n_heads, c.head_dim)).astype(np.float32)
    for layer in range(c.n_layers):
        local = layer in c.local_layers
        args = (jnp.asarray(q), cache, jnp.int32(layer), CPU_TABLE, jnp.asarray(positions), CPU_WINDOW, local)
        kernel = np.asarray(paged_attention(dataclasses.replace(c, attention="cpu_kernel"), *args))
        plain = np.asarray(paged_attention(c, *args))
        pages = [np.asarray(x[layer], np.float64) for x in (k, v)]  # the rounded pages, exactly
        want = numpy_attention(q.astype(np.float64), *pages, CPU_TABLE, positions, c.attention_scale,
                               CPU_SLIDING if local else None)  # fmt: skip
        np.testing.assert_allclose(kernel, want, atol=1e-5, err_msg=f"{layer=}")
        np.testing.assert_allclose(kernel, plain, atol=2e-5, err_msg=f"{layer=}")


@built
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [1, 6])  # decode rows, a prefill chunk
def test_cpu_pool_written_in_place_equals_the_scatter(T, kv_dtype):
    """The CPU kernel's pool (CpuKVCache) writes a step's keys and values with jaxserve's kernel, in place:
    the same pool as KVCache's scatter, in every layer, with the writes it drops (rows without a page, and
    positions before `write_from`, in pages shared with other sequences) dropped, under jit with the pool
    donated as the steps donate it."""
    c = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=32, mlp_dim=64, kv_dtype=kv_dtype
    )
    rng = np.random.default_rng(T)
    shapes = KVCache.shape_dtype(c, CPU_P, CPU_S)
    pool = [jnp.asarray(rng.normal(size=x.shape), jnp.float32).astype(c.cache_dtype) for x in (shapes.k, shapes.v)]
    bits = lambda x: x if x.dtype == jnp.float32 else jax.lax.bitcast_convert_type(x, jnp.uint16)
    positions = cpu_case(T)
    k, v = (jnp.asarray(rng.normal(size=(len(positions), T, c.n_kv_heads, c.head_dim)), jnp.float32) for _ in "kv")
    write_from = jnp.asarray([0, 0, T, 0, CPU_WINDOW - T // 2], jnp.int32)  # row 2: all shared; row 4: half
    cpu = LAYOUTS["cpu_kernel"]
    assert cpu is not KVCache and issubclass(cpu, KVCache)
    write = jax.jit(lambda cache, layer: cache.write(layer, CPU_TABLE, positions, k, v, write_from), donate_argnums=0)
    for layer in range(c.n_layers):
        want = KVCache(*map(bits, pool)).write(layer, CPU_TABLE, positions, k, v, write_from)
        got = write(cpu(*(jnp.array(bits(x)) for x in pool)), jnp.int32(layer))  # a copy: donated
        assert type(got) is cpu
        np.testing.assert_array_equal(np.asarray(got.k), np.asarray(want.k), err_msg=f"{layer=}")
        np.testing.assert_array_equal(np.asarray(got.v), np.asarray(want.v), err_msg=f"{layer=}")
        assert not np.array_equal(np.asarray(got.k), np.asarray(bits(pool[0])))  # something was written


TINY = Path(__file__).parent / "reference" / "hf-tiny"


@built
@pytest.mark.parametrize("family", ["llama", "gemma3"])  # Gemma 3's: local layers with a window of 8
def test_cpu_kernel_served_steps_equal_the_plain_full_pass(family, tmp_path):
    """Prefill in chunks of 3 and 8 greedy steps of two slots through the jitted steps with the CPU kernel
    (the layer and the local flag traced in the layer scan, the pool in its carry): the tokens and their
    logprobs are the plain path's full pass."""
    model = load_checkpoint(convert_hf(TINY / family, tmp_path / "ckpt", progress=False), make_mesh(1, 1))
    assert model.cfg.attention == "plain"
    served = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, attention="cpu_kernel"))
    assert_served_steps_equal_full_pass(model, served)


def test_interpret_forward_with_the_tpu_kernel_equals_the_plain_forward():
    """The whole model (Gemma 3's attention shape and local layer, random weights) with the TPU kernel: a
    prefill of two rows then two decode steps give the plain forward's logits; the local/global choice
    is the layer scan's traced index, the pool the scan's carry."""
    c = config("gemma3")
    params = init_params(c)
    tokens = np.random.default_rng(3).integers(0, c.vocab_size, (2, 26), dtype=np.int32)
    table = TABLE[:2]
    outputs = []
    for cfg in (c, dataclasses.replace(c, attention="tpu_kernel")):
        forward = jax.jit(Transformer(cfg).apply, static_argnums=5)  # (params, tokens, positions, cache, table, window)
        positions = np.broadcast_to(np.arange(24, dtype=np.int32), (2, 24))
        logits, cache = forward(params, tokens[:, :24], positions, kv_cache_for(cfg).zeros(cfg, P, S), table, WINDOW)
        steps = [logits[:, -1]]
        for t in (24, 25):
            logits, cache = forward(params, tokens[:, t : t + 1], np.full((2, 1), t, np.int32), cache, table, WINDOW)
            steps.append(logits[:, 0])
        outputs.append(np.stack(steps))
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-4)


def test_choose_takes_a_kernel_on_its_accelerator_only_where_it_takes_the_shapes(caplog):
    c = config("smollm2")
    one, four = types.SimpleNamespace(size=1), types.SimpleNamespace(size=4)
    with caplog.at_level(logging.INFO, logger="jaxserve.model.attention_kernels"):
        assert choose(c, one, 128, backend="tpu").attention == "tpu_kernel"
        assert choose(c, one, 128, backend="gpu").attention == "gpu_kernel"
        on_cpu = "cpu_kernel" if kernels.available() else "plain"
        assert choose(c, one, 128, backend="cpu").attention == on_cpu
        assert choose(c, four, 128, backend="cpu").attention == "plain"  # not mapped over a mesh either
        assert choose(dataclasses.replace(c, head_dim=40), one, 128, backend="cpu").attention == "plain"
        assert choose(c, one, 112, backend="cpu").attention == on_cpu  # a multiple of 16, not a power of two
        assert choose(c, one, 100, backend="cpu").attention == "plain"
        assert choose(c, one, 100, backend="tpu").attention == "plain"
        assert "not the TPU kernel: page size 100 is not a multiple of 16" in caplog.text
        assert choose(c, one, 96, backend="gpu").attention == "plain"
        assert "not the GPU kernel: page size 96 is not a power of two" in caplog.text
        assert choose(dataclasses.replace(c, head_dim=48), one, 128, backend="gpu").attention == "plain"
        assert "head dim 48" in caplog.text
        assert choose(c, four, 128, backend="tpu").attention == "plain"
        assert "a mesh of 4 devices" in caplog.text
        narrow = config("tiny_bf16_pool")  # float32 activations over bfloat16 pages
        assert choose(narrow, one, 128, backend="tpu").attention == "tpu_kernel"  # it computes in float32
        assert choose(narrow, one, 128, backend="gpu").attention == "plain"
        assert "a bfloat16 KV pool under float32 activations" in caplog.text
        assert choose(c.with_kv_dtype("bfloat16"), one, 128, backend="gpu").attention == "gpu_kernel"  # the same
