"""A model ready to serve: its config and weights on a mesh, with its tokenizer and the int8 formulation chosen
for this machine. Declared beside the model so
the device half takes a model without importing the checkpoint formats that made it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax

from jaxserve.model.config import ModelConfig
from jaxserve.model.quant import Formulation

if TYPE_CHECKING:  # the model imports only jax, flax and numpy
    from jaxserve.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    name: str
    cfg: ModelConfig
    params: dict  # on the mesh
    param_shardings: dict
    tokenizer: Tokenizer
    mesh: jax.sharding.Mesh
    formulation: Formulation = Formulation()  # how its int8 matmuls compute here (device.formulation chooses)
