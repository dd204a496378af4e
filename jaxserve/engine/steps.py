"""A plain jitted forward over the mesh, with explicit shardings: tokens/positions [B, T] and the cache in,
logits and the updated cache out, the cache donated so XLA updates it in place; the attention window W is
static. Tests and diagnostics use it directly; the engine's own steps (core.py) share `cache_shardings`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.model import KVCache, ModelConfig, Transformer
from jaxserve.sharding import named_sharding, tree_shardings


def cache_shardings(cfg: ModelConfig, mesh, slots: int, length: int) -> KVCache:
    shapes = KVCache.shape_dtype(cfg, slots, length)
    return tree_shardings(KVCache.axes(), shapes, mesh)


@dataclasses.dataclass
class Forward:
    cfg: ModelConfig
    mesh: jax.sharding.Mesh
    param_shardings: object
    slots: int  # B
    cache_len: int  # S

    def __post_init__(self):
        model = Transformer(self.cfg)
        self.cache_sharding = cache_shardings(self.cfg, self.mesh, self.slots, self.cache_len)
        batch = named_sharding(("batch", "seq"), (self.slots, 1), self.mesh)
        logits = named_sharding(("batch", "seq", "vocab"), (self.slots, 1, self.cfg.vocab_size), self.mesh)

        def step(params, tokens, positions, cache, window):
            return model.apply(params, tokens, positions, cache, window)

        self._step = jax.jit(step, static_argnums=(4,), donate_argnums=(3,),
                             in_shardings=(self.param_shardings, batch, batch, self.cache_sharding),
                             out_shardings=(logits, self.cache_sharding))

    def new_cache(self) -> KVCache:
        make = jax.jit(lambda: KVCache.zeros(self.cfg, self.slots, self.cache_len), out_shardings=self.cache_sharding)
        return make()

    def __call__(self, params, tokens, positions, cache: KVCache, window: int):
        """tokens, positions [B, T] -> (logits [B, T, V], cache). Every position must be < window <= S."""
        assert window <= self.cache_len
        return self._step(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), cache, window)
