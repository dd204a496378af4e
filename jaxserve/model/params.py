"""Parameter tree declared once: its shapes, dtypes and logical axes all come from the module's init."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxserve.model.config import ModelConfig
from jaxserve.model.kv_cache import KVCache
from jaxserve.model.transformer import Transformer


def _init(cfg: ModelConfig, rng):
    cfg = dataclasses.replace(cfg, attention="plain")  # the parameters are the same whatever computes attention
    cache, table = KVCache.per_row(cfg, 1, 1)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(cfg).init(rng, tokens, tokens, cache, table, 1)


def abstract_params(cfg: ModelConfig):
    """(ShapeDtypeStruct tree, logical-axes tree) of the parameters, without allocating them."""
    boxed = jax.eval_shape(lambda: _init(cfg, jax.random.key(0)))
    axes = jax.tree.map(lambda p: tuple(p.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return nn.unbox(boxed), axes


def init_params(cfg: ModelConfig, seed: int = 0):
    """Randomly initialised parameters (for training the tiny model and for tests)."""
    return nn.unbox(_init(cfg, jax.random.key(seed)))
