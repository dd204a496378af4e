"""Device mesh and the rule table from logical axis names to mesh axes ("data", "model").

A logical dimension whose size the mesh axis does not divide (SmolLM2's 9 query heads on 2 model
devices, say) is replicated instead, with one logged note: sharding is an optimisation, never an error.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (absent: replicated). "data" names no logical axis: every data replica holds the
# whole state, and a decode step splits its rows over "data" (`device.steps.forward`)
RULES: dict[str, str] = {
    "vocab": "model",
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
}

_noted: set[tuple] = set()


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A data x model mesh; `model=None` takes every device not used by `data`."""
    devices = list(devices if devices is not None else jax.devices())
    if model is None:
        model = len(devices) // data
    if data * model > len(devices) or data < 1 or model < 1:
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, {len(devices)} available")
    return Mesh(np.array(devices[: data * model]).reshape(data, model), MESH_AXES)


def parse_mesh(spec: str) -> tuple[int, int]:
    """'data=2,model=4' -> (2, 4); either may be left out (default 1)."""
    sizes = {"data": 1, "model": 1}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit():
            raise ValueError(f"bad mesh spec {spec!r}: expected e.g. data=1,model=2")
        sizes[name.strip()] = int(value)
    return sizes["data"], sizes["model"]


def logical_to_spec(axes, shape, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`, replicating dimensions the mesh cannot divide."""
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = RULES.get(name) if name is not None else None
        if mesh_axis is not None and mesh.shape[mesh_axis] > 1:
            if size % mesh.shape[mesh_axis]:
                key = (name, size, mesh_axis, mesh.shape[mesh_axis])
                if key not in _noted:
                    _noted.add(key)
                    log.info(
                        "replicating logical axis %r (size %d): mesh axis %r of size %d does not divide it",
                        name,
                        size,
                        mesh_axis,
                        mesh.shape[mesh_axis],
                    )
                mesh_axis = None
        else:
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(axes, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(axes_tree, shape_tree, mesh: Mesh):
    """NamedSharding for every leaf of `shape_tree`, from the matching logical-axes tuple."""
    return jax.tree.map(
        lambda axes, s: named_sharding(axes, s.shape, mesh),
        axes_tree,
        shape_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )
