"""jaxserve's int8 matmul kernel (jaxserve.kernels) against NumPy on every path this CPU runs (the `isa`
fixture), its packed layout, and the served steps computing with it against the float32 formulation's full
pass."""

import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from served import assert_served_steps_equal_full_pass

from jaxserve import kernels
from jaxserve.checkpoint import convert_hf, load_checkpoint
from jaxserve.device.formulation import CANDIDATES, Choice, kernel_possible
from jaxserve.sharding import make_mesh

TINY_LLAMA = Path(__file__).parent / "reference" / "hf-tiny" / "llama"

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler or no CPU backend here")


def weights(rng, kernel_shape, contracted, group):
    """An int8 kernel and its float32 scales (one per output channel and `group` inputs along the last
    input axis), and the float32 weights [K, N] they stand for."""
    kernel = rng.integers(-127, 128, kernel_shape, dtype=np.int8)
    scale_shape = list(kernel_shape)
    scale_shape[contracted - 1] //= group
    scale = rng.uniform(0.001, 0.02, scale_shape).astype(np.float32)
    w = kernel.astype(np.float32) * np.repeat(scale, group, axis=contracted - 1)
    k = int(np.prod(kernel_shape[:contracted]))
    return kernel, scale, w.reshape(k, -1)


@pytest.mark.parametrize(
    "kernel_shape, contracted, group",
    [
        ((576, 9, 64), 1, 64),  # SmolLM2's q: 64-column tiles
        ((9, 64, 576), 2, 64),  # its o: two input axes
        ((64, 2, 16), 1, 64),  # 32 outputs: 16-column tiles
        ((4, 16, 64), 2, 16),  # groups of 16
    ],
)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_packed_kernel_equals_the_dequantized_product(kernel_shape, contracted, group, rows, isa):
    """Layer 1 of a stack of three, read in place."""
    rng = np.random.default_rng(rows)
    layers = [weights(rng, kernel_shape, contracted, group) for _ in range(3)]
    stack = [jnp.stack([kernels.pack(jnp.asarray(w[i]), contracted) for w in layers]) for i in (0, 1)]
    x = rng.standard_normal((rows, layers[1][2].shape[0])).astype(np.float32)
    y = jax.jit(kernels.int8_matmul, static_argnums=3, static_argnames="isa")(
        x, *stack, contracted, jnp.int32(1), isa=isa
    )
    want = x.astype(np.float64) @ layers[1][2]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("group", [16, 32, 64])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_nk_kernel_equals_the_dequantized_product(group, rows, isa):
    """The tied embedding as the output projection: weights [N, K], a dot product along each row."""
    rng = np.random.default_rng(group + rows)
    kernel, scale, w = weights(rng, (192, 448), 2, group)  # [N, K]: every axis but the first is an input
    x = rng.standard_normal((rows, 448)).astype(np.float32)
    nk = jax.jit(kernels.int8_matmul, static_argnames=("layout", "isa"))
    y = nk(x, kernel[None], scale.reshape(1, 192, -1), layout="nk", isa=isa)
    want = x.astype(np.float64) @ w.reshape(192, 448).T
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_path_that_serves_is_the_fastest_the_compiler_builds(monkeypatch):
    """A CPU with AMX and a g++ without its flags (older than 11) serves AVX512-VNNI's path, not XLA alone."""
    amx = next(i for i in kernels.ISAS if i.name == "avx512_amx")
    monkeypatch.setattr(kernels.host, "cpu_flags", lambda: frozenset().union(*(i.needs for i in kernels.ISAS)))
    monkeypatch.setattr(kernels, "_compiler_takes", lambda flags: not set(flags) & {"-mamx-tile", "-mamx-int8"})
    kernels.best.cache_clear()
    try:
        assert amx in kernels.runnable() and kernels.best().name == "avx512_vnni"
        monkeypatch.setattr(kernels, "_compiler_takes", lambda flags: True)
        kernels.best.cache_clear()
        assert kernels.best() == amx
    finally:
        monkeypatch.undo()
        kernels.best.cache_clear()
    assert kernels._compiler_takes(kernels.best().flags) and not kernels._compiler_takes(("-mno-such-flag",))


def test_a_layer_out_of_the_stack_is_an_error():
    kernel, scale, _ = weights(np.random.default_rng(0), (64, 64), 1, 64)
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(kernels.int8_matmul(np.ones((1, 64), np.float32), kernel[None], scale[None], 1, 1))


def test_pack_puts_each_tile_of_columns_in_one_run():
    a = np.arange(3 * 128).reshape(3, 128)  # [K, N]: two tiles of 64 columns
    p = np.asarray(kernels.pack(jnp.asarray(a), 1)).reshape(-1)
    np.testing.assert_array_equal(p[: 3 * 64], a[:, :64].reshape(-1))  # tile 0, row by row
    np.testing.assert_array_equal(p[3 * 64 :], a[:, 64:].reshape(-1))
    b = np.arange(2 * 4 * 32).reshape(2, 4, 32)  # 32 outputs: tiles of 16
    np.testing.assert_array_equal(np.asarray(kernels.unpack(kernels.pack(jnp.asarray(b), 2), 2)), b)


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    out = convert_hf(TINY_LLAMA, tmp_path_factory.mktemp("int8") / "ckpt", progress=False, quantize="int8")
    return load_checkpoint(out, make_mesh(1, 1))


@pytest.mark.parametrize("kernel_below_rows", [None, 3], ids=["every row", "decode only"])
def test_served_steps_with_the_kernel_equal_the_float32_full_pass(tiny_int8, kernel_below_rows):
    """Prefill in chunks of 3 and 8 greedy steps of two slots, with the kernel at every row count, or with
    the kernel below 3 rows (the decode steps) and XLA over the packed weights above (the prefills unpack
    them): the tokens and their logprobs are the float32 formulation's full pass."""
    assert kernel_possible(tiny_int8)
    rule = CANDIDATES["kernel"] if kernel_below_rows is None else Choice(None, "forced", {}, kernel_below_rows)
    served = rule.apply(tiny_int8)
    assert served.params["params"]["layers"]["q"].shape == tiny_int8.params["params"]["layers"]["q"].shape
    assert_served_steps_equal_full_pass(tiny_int8, served)


def test_one_row_kernel_against_a_plain_read(bench_bandwidth, bandwidth_summary):
    """scripts/bench_bandwidth.py's measure on made-up int8 weights of SmolLM2's gate shape [576, 1536]
    (groups of 64 inputs), packed, stacked to as many bytes as its layers' Q4_1 blocks (68 MB): the 1-row
    kernel of the path that serves against a plain read of the same bytes, timed interleaved. The ratio goes
    to the terminal summary -- reported, never asserted. The kernel's result is checked."""
    rng = np.random.default_rng(0)
    layers, k, n = 72, 576, 1536
    kernel = rng.integers(-127, 128, (layers, k, n), np.int8)
    scale = rng.uniform(0.001, 0.02, (layers, k // 64, n)).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float32)
    y = jax.jit(kernels.int8_matmul, static_argnums=3)(x, kernel, scale, 1, layers - 1)
    w = kernels.unpack(kernel[-1], 1).astype(np.float64) * np.repeat(kernels.unpack(scale[-1], 1), 64, 0)
    want = x.astype(np.float64) @ w
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    repeats = 15
    arrays = (jnp.asarray(kernel), jnp.asarray(scale))  # on the device once (NumPy ones are copied each call)
    runs = bench_bandwidth.kernel_against_read([("int8", arrays, 32)], layers, jnp.asarray(x), repeats)
    nbytes = kernel.nbytes + scale.nbytes
    what = f"int8 {layers} x [{k}, {n}] ({nbytes / 1e6:.0f} MB), {kernels.best().name}, median of {repeats}"
    bandwidth_summary[what] = bench_bandwidth.summary(runs, nbytes, statistics.median)
