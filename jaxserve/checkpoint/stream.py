"""Parameters streamed piece by piece: an importer yields one tensor of the source file at a time, already in
jaxserve's layout, with the place it takes in a stacked parameter; a sink puts it there.

A piece is (path, index, value): `path` names a leaf under {'params': ...} ("layers", "q"), `index` the part
of it the value fills, one entry per leading axis of the leaf — an int picks one position (a layer; gate or
up in gate_up), None takes the whole axis; () is the whole leaf. Converting writes each piece straight into
arrays on the mesh (`place`), so the host holds one source tensor at a time, never the parameter tree;
`collect` builds the NumPy tree instead, for tests and small models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax

from jaxserve.checkpoint.quantize import GROUPED_AXIS, quantize_array
from jaxserve.model.config import ModelConfig
from jaxserve.model.params import abstract_params
from jaxserve.model.quant import group_size
from jaxserve.sharding import tree_shardings

LeafPath = tuple[str, ...]
Index = tuple[int | None, ...]
Piece = tuple[LeafPath, Index, np.ndarray]


def leaf_shapes(cfg: ModelConfig) -> dict[LeafPath, jax.ShapeDtypeStruct]:
    """Every parameter leaf of the model, by path under {'params': ...}."""
    shapes, _ = abstract_params(cfg)
    return flatten_dict(shapes["params"])


def expected(cfg: ModelConfig) -> set[tuple[LeafPath, Index]]:
    """The (path, index) pieces a float model needs: each layer of a stacked leaf, each half of gate_up."""
    want = set()
    for path in leaf_shapes(cfg):
        layers = range(cfg.n_layers) if path[0] == "layers" else [None]
        for i in layers:
            if path == ("layers", "gate_up"):
                want |= {(path, (i, None, 0)), (path, (i, None, 1))}
            else:
                want.add((path, () if i is None else (i,)))
    return want


def check_complete(pieces: Iterable[tuple[LeafPath, Index]], cfg: ModelConfig, source) -> None:
    """Refuse a source that lacks a piece of the model, naming the first few missing."""
    missing = sorted(expected(cfg) - set(pieces), key=str)
    if missing:
        names = [".".join(path) + "".join(f"[{i}]" for i in index if i is not None) for path, index in missing]
        raise ValueError(f"{source} lacks tensors for {', '.join(names[:5])}")


def _slices(index: Index) -> tuple:
    return tuple(slice(None) if i is None else i for i in index)


def quantize_pieces(pieces: Iterable[Piece], cfg: ModelConfig) -> Iterator[Piece]:
    """int8 pieces (and their scales) for the matmul weights, the rest unchanged. Groups never span the
    indexed axes (layers, gate/up), so quantizing piece by piece gives the whole leaf's result."""
    for path, index, value in pieces:
        name = path[-1]
        if name not in GROUPED_AXIS:
            yield path, index, value
            continue
        a = GROUPED_AXIS[name]
        a -= sum(1 for i in index[:a] if i is not None)  # the axis in the piece, its leaf's picked axes gone
        q, scale = quantize_array(value, a, group_size(cfg, value.shape[a]))
        del value
        yield path, index, q
        yield (*path[:-1], name + "_scale"), index, scale


def collect(pieces: Iterable[Piece], cfg: ModelConfig) -> dict:
    """The NumPy parameter tree ({'params': ...}) in the dtypes the model declares."""
    shapes = leaf_shapes(cfg)
    leaves = {path: np.zeros(s.shape, s.dtype) for path, s in shapes.items()}
    for path, index, value in pieces:
        leaves[path][_slices(index)] = value
    return {"params": unflatten_dict(leaves)}


def _write(buf, value, starts):
    return lax.dynamic_update_slice(buf, value, starts)


_write_jit = jax.jit(_write, donate_argnums=0)  # the layer is a traced start: one compile per leaf shape


def place(pieces: Iterable[Piece], cfg: ModelConfig, mesh) -> dict:
    """The parameter tree on `mesh`, each piece written into its leaf (zeros, sharded as the model
    declares, updated in place) as it arrives; every leaf must be filled (the importer checks)."""
    shapes, axes = abstract_params(cfg)
    leaf_shape = flatten_dict(shapes["params"])
    sharding = flatten_dict(tree_shardings(axes, shapes, mesh)["params"])
    bufs: dict[LeafPath, jax.Array] = {}
    for path, index, value in pieces:
        s = leaf_shape[path]
        value = np.asarray(value, s.dtype)
        if not index:  # the whole leaf
            bufs[path] = jax.device_put(value, sharding[path])
            del value
            continue
        if path not in bufs:
            bufs[path] = jnp.zeros(s.shape, s.dtype, device=sharding[path])
        # the value at full rank: a 1 for each picked axis, which starts at the picked position
        full = [1 if i is not None else None for i in index] + [None] * (len(s.shape) - len(index))
        dims = iter(value.shape)
        full = tuple(next(dims) if d is None else d for d in full)
        starts = tuple(np.int32(i or 0) for i in index) + (np.int32(0),) * (len(s.shape) - len(index))
        bufs[path] = _write_jit(bufs[path], value.reshape(full), starts)
        del value
    assert set(bufs) == set(leaf_shape), set(leaf_shape) - set(bufs)
    return {"params": unflatten_dict(bufs)}
