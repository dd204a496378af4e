"""Single-sequence streaming generation (what `jaxserve generate` runs): prefill, then one token a step.

Shapes come from small power-of-two buckets (prompt length, cache length, attention window), so a
handful of compiled variants serve every prompt.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.checkpoint import LoadedModel
from jaxserve.engine.steps import Forward


def bucket(n: int, smallest: int = 16) -> int:
    """The smallest power of two >= n (and >= smallest)."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


@jax.jit
def _sample(logits, key, temperature):
    """logits [V]; temperature 0 is exact argmax."""
    greedy = jnp.argmax(logits)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, greedy)


def generate(model: LoadedModel, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
             seed: int = 0, stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yields generated token ids one by one; stops after max_tokens or on a token in stop_ids."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    total = len(prompt_ids) + max_tokens
    if total > model.cfg.max_context:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                         f"model's context of {model.cfg.max_context}")
    cache_len = min(bucket(total, 64), model.cfg.max_context)
    fwd = Forward(model.cfg, model.mesh, model.param_shardings, slots=1, cache_len=cache_len)
    cache = fwd.new_cache()
    T = bucket(len(prompt_ids))
    tokens = np.zeros((1, T), np.int32)
    tokens[0, : len(prompt_ids)] = prompt_ids
    positions = np.arange(T, dtype=np.int32)[None]  # padding sits after the prompt; later writes overwrite it
    logits, cache = fwd(model.params, tokens, positions, cache, min(bucket(T, 64), cache_len))
    last = logits[0, len(prompt_ids) - 1]
    key = jax.random.key(seed)
    pos = len(prompt_ids)
    for _ in range(max_tokens):
        key, sub = jax.random.split(key)
        token = int(_sample(last, sub, temperature))
        yield token
        if token in stop_ids:
            return
        window = min(bucket(pos + 1, 64), cache_len)
        logits, cache = fwd(model.params, np.array([[token]]), np.array([[pos]]), cache, window)
        last = logits[0, 0]
        pos += 1
