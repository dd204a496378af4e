"""On-device sampling, vectorized per slot: every knob is an array with one row per slot, so no request's
parameters ever change a compiled shape.

Order of operations on a row's logits: + logit_bias, - frequency/presence penalties (OpenAI's definition
over the tokens generated so far), tokens outside the row's `allowed` bitmask (a grammar's) to -inf, then
greedy (temperature 0) or temperature + top_p sampling.
The knobs are declared in `state.SamplingState`.
Logprobs (the chosen token's and the top TOP_LOGPROBS) are the log-softmax of the model's raw logits, before bias,
penalties and temperature: the model's own distribution, the same for prompt (echo) and generated tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.device.state import SamplingState
from jaxserve.engine.types import TOP_LOGPROBS

__all__ = ["TOP_LOGPROBS", "record", "sample", "top_k", "top_logprobs", "unpack_mask"]

BLOCK = 128  # vocabulary entries a block in `top_k`'s first pass


def top_k(x, k: int):
    """jax.lax.top_k(x, k) over the last axis of x [..., V], equal to it (ties: the lower index first), in two
    passes: each block of BLOCK entries' largest, then top_k over the entries of the k blocks whose largest
    lead, for a top-k entry lies in one of them. XLA:CPU's TopK over whole rows is far slower than one pass
    over them (the figures are in the commit that made this)."""
    *lead, V = x.shape
    if V % BLOCK or V // BLOCK <= k:
        return jax.lax.top_k(x, k)
    blocks = x.reshape(-1, V // BLOCK, BLOCK)
    # the k blocks in vocabulary order, so that equal entries of two blocks fall to the lower index
    best = jnp.sort(jax.lax.top_k(blocks.max(-1), k)[1], axis=-1)
    candidates = jnp.take_along_axis(blocks, best[:, :, None], axis=1).reshape(blocks.shape[0], k * BLOCK)
    values, at = jax.lax.top_k(candidates, k)
    ids = jnp.take_along_axis(best, at // BLOCK, axis=1) * BLOCK + at % BLOCK
    return values.reshape(*lead, k), ids.reshape(*lead, k)


def top_logprobs(logits, chosen):
    """Raw logits [..., V] and token ids `chosen` [...] -> (their logprobs [...], top ids [..., K], top
    logprobs [..., K]), K = TOP_LOGPROBS (or V, for a vocabulary smaller than that): the log-softmax, as
    jax.nn.log_softmax computes it, at those entries alone. The top K of the logits are those of the
    logprobs, and the whole [..., V] of logprobs is never written (at 32 rows of SmolLM2's vocabulary, 6 MB
    a step written and read again)."""
    x = logits.astype(jnp.float32)
    peak = x.max(axis=-1, keepdims=True)
    log_total = jnp.log(jnp.sum(jnp.exp(x - peak), axis=-1, keepdims=True))
    top_x, top_ids = top_k(x, min(TOP_LOGPROBS, logits.shape[-1]))
    at = jnp.take_along_axis(x, chosen[..., None], axis=-1)
    return ((at - peak) - log_total)[..., 0], top_ids.astype(jnp.int32), (top_x - peak) - log_total


def _top_p_mask(probs, top_p):
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one).

    Bisects for the largest threshold t with mass(p >= t) >= top_p instead of sorting the vocabulary:
    on CPU a [B, V] sort costs far more than 32 rounds of compare-and-sum."""

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        enough = jnp.sum(jnp.where(probs >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo = jnp.zeros(probs.shape[:1], probs.dtype)
    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, jnp.max(probs, axis=-1)))
    return probs >= jnp.minimum(lo, jnp.max(probs, axis=-1))[:, None]


def _draw(x, state: SamplingState):
    """One categorical draw per row by inverse CDF: a single uniform per row from the row's own key stream
    (the sequence's key folded with its step), instead of V Gumbel variates per row."""
    probs = jax.nn.softmax(x / jnp.maximum(state.temperature, 1e-6)[:, None], axis=-1)
    probs = jax.lax.cond(
        jnp.any(state.top_p < 1.0), lambda p: jnp.where(_top_p_mask(p, state.top_p), p, 0.0), lambda p: p, probs
    )
    cdf = jnp.cumsum(probs, axis=-1)
    keys = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k), i))(state.key, state.step)
    u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
    # first index whose cumulative mass exceeds u; tokens with zero mass can never be picked
    return jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), x.shape[-1] - 1)


def unpack_mask(words, vocab: int):
    """Packed masks [B, ceil(V/32)] int32 -> bool [B, V]: token t is bit t % 32 of word t // 32."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def _constrain(x, allowed):
    return jnp.where(unpack_mask(allowed, x.shape[-1]), x, -jnp.inf)


def sample(logits, state: SamplingState):
    """logits [B, V] -> (tokens [B], chosen logprob [B], top ids [B, K], top logprobs [B, K]).

    Pure: the caller records the tokens with `record` for the rows that really advanced."""
    logits = logits.astype(jnp.float32)
    x = logits + state.bias
    x = x - state.frequency[:, None] * state.counts - state.presence[:, None] * (state.counts > 0)
    x = jax.lax.cond(jnp.any(state.allowed != -1), _constrain, lambda x, _: x, x, state.allowed)
    greedy = top_k(x, 1)[1][:, 0]  # argmax, first index on ties; faster than argmax on XLA:CPU
    drawn = jax.lax.cond(jnp.any(state.temperature > 0), _draw, lambda x, s: greedy, x, state)
    tokens = jnp.where(state.temperature > 0, drawn, greedy).astype(jnp.int32)
    return tokens, *top_logprobs(logits, tokens)


def record(state: SamplingState, tokens, advanced) -> SamplingState:
    """Count `tokens` [B] for the penalties and move the key streams on, for the first B rows where `advanced`."""
    step, rows = advanced.astype(jnp.int32), tokens.shape[0]
    counts = state.counts.at[jnp.arange(rows), tokens].add(step)
    return state.replace(counts=counts, step=state.step.at[:rows].add(step))
