"""Conversion under a memory measure, for the tests that it streams (test_hf_import, test_checkpoint)."""

import tracemalloc

import jax


def streamed_conversion(convert, source, tmp_path, mesh):
    """Convert `source` twice, the first to warm imports and compilations -> (the second's folder, the peak
    of Python's allocations, NumPy's included, during it, as tracemalloc counts them)."""
    convert(source, tmp_path / "warm", progress=False, mesh=mesh)
    tracemalloc.start()
    try:
        out = convert(source, tmp_path / "ckpt", progress=False, mesh=mesh)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_streamed(peak: int, params) -> None:
    """A few source tensors at a time, not the parameter tree, nor one stacked (float32) parameter."""
    leaves = jax.tree.leaves(params)
    total, stacked = sum(x.nbytes for x in leaves), max(x.nbytes for x in leaves)
    assert peak < stacked / 2 and peak < total / 8, (peak, stacked, total)
