"""The model: config, Flax transformer and KV cache. Imports only jax, flax and numpy."""

from jaxserve.model.attention_kernels import kv_cache_for
from jaxserve.model.config import ModelConfig
from jaxserve.model.kv_cache import KVCache
from jaxserve.model.loaded import LoadedModel
from jaxserve.model.params import abstract_params, init_params
from jaxserve.model.transformer import Transformer

__all__ = ["ModelConfig", "KVCache", "LoadedModel", "Transformer", "abstract_params", "init_params", "kv_cache_for"]
