"""The jitted device steps of continuous batching, at module level: prefill, copy_page, insert, resume,
a decode step in two halves (forward, then sample_step), set_masks, release.

Each takes a `StepSpec` (static: the model config, EOS and where the state lives) and the `DecodeState`,
which it donates so XLA updates it in place, and returns the new state (constrained to the same
shardings, so the next call finds what it compiled for) with the step's outputs, replicated. Shapes
that vary are static arguments bucketed by the caller (`core.JaxRunner`): the attention window, the
prefill chunk and the decode rows. Page tables are host arrays passed with each call, of one fixed
shape. Every trace is counted in `spec.compiles`, so a test can prove that no request compiles anything.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.device.sampling import TOP_LOGPROBS, record, sample, top_logprobs
from jaxserve.device.state import DecodeState
from jaxserve.model import ModelConfig, Transformer
from jaxserve.model.kv_cache import write_targets
from jaxserve.model.quant import Formulation


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the steps are compiled for. Hashable: equal specs share compiled steps."""

    cfg: ModelConfig
    formulation: Formulation  # how the int8 matmuls compute (static: part of what is compiled)
    eos_ids: tuple[int, ...]  # every id that ends a generation (EOS, the chat template's end of turn)
    state_sharding: DecodeState  # a NamedSharding per array
    replicated: NamedSharding
    compiles: collections.Counter = dataclasses.field(default_factory=collections.Counter, compare=False, hash=False)


@struct.dataclass
class StepOutput:
    """What one step (or one insert) produced, per slot: arrays [B] (or [1]), top_* [B, K]."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    done: jax.Array  # the slot finished with this token (EOS or max_tokens)
    valid: jax.Array  # the slot was active: this row is a real token


@struct.dataclass
class PrefillOutput:
    logprobs: jax.Array  # [P, T] log p(targets[t] | prompt[:start+t+1]) for each row (zero unless scored)
    top_ids: jax.Array  # [P, T, K]
    top_logprobs: jax.Array
    last_logits: jax.Array  # [P, V] at each row's last real token


def _is_eos(spec: StepSpec, tokens):
    """tokens [B] -> bool [B]: one of spec.eos_ids (a small static set: one compare each)."""
    hit = jnp.zeros(tokens.shape, bool)
    for e in spec.eos_ids:
        hit = hit | (tokens == e)
    return hit


def _settle(spec: StepSpec, state: DecodeState, out=None):
    state = jax.lax.with_sharding_constraint(state, spec.state_sharding)
    if out is None:
        return state
    return state, jax.lax.with_sharding_constraint(out, spec.replicated)


# XLA:CPU's fusion emitters compile the scanned layer body (RoPE in it) for a decode step's shapes to other
# bits than for a prefill's: with the former emitters (and transformer.ordered_sum) a decode step's logits
# are those of a prefill of the same tokens, bit for bit (SmolLM2 under q8: 0.01-0.1 logprob apart before).
# A debug option only XLA:CPU reads (not yet compiled on a GPU or TPU here).
COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
_jit = functools.partial(jax.jit, donate_argnames=("state",), compiler_options=COMPILER_OPTIONS)


@functools.partial(_jit, static_argnames=("spec", "window"))
def prefill(
    spec: StepSpec,
    params,
    state: DecodeState,
    tokens,
    starts,
    lengths,
    table,
    write_from,
    targets,
    score,
    adapter,
    lora,
    window: int,
):
    """Write rows of prompt tokens [P, T] (row p starting at position starts[p], `lengths[p]` real tokens)
    into the pages of `table` [P, pages per sequence] from position write_from[p] on (earlier ones are in
    shared pages already), and return each row's last-position logits; with `score` (a traced bool) also
    every position's logprob of `targets` and the top K. Row p computes with LoRA adapter adapter[p] of the
    stack `lora` (None: no adapters are served)."""
    spec.compiles["prefill"] += 1
    model = Transformer(spec.cfg, spec.formulation)
    P, T = tokens.shape
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    adapters = None if lora is None else (lora, adapter)
    x, cache = model.apply(params, tokens, positions, state.cache, table, window, write_from, adapters, method="hidden")
    last = jnp.maximum(lengths - 1, 0)

    def every_position(x):
        logits = model.apply(params, x, method="logits")
        chosen, top_ids, top_lp = top_logprobs(logits, targets)
        return PrefillOutput(
            logprobs=chosen, top_ids=top_ids, top_logprobs=top_lp, last_logits=logits[jnp.arange(P), last]
        )

    def last_position(x):  # the logits over [T, V] and their top K are much of a short prefill's work
        logits = model.apply(params, x[jnp.arange(P), last][:, None], method="logits")[:, 0]
        return PrefillOutput(
            logprobs=jnp.zeros((P, T)),
            top_ids=jnp.zeros((P, T, TOP_LOGPROBS), jnp.int32),
            top_logprobs=jnp.zeros((P, T, TOP_LOGPROBS)),
            last_logits=logits,
        )

    return _settle(spec, state.replace(cache=cache), jax.lax.cond(score, every_position, last_position, x))


@functools.partial(_jit, static_argnames=("spec",))
def copy_page(spec: StepSpec, state: DecodeState, src, dst):
    """Page dst takes page src's contents: a choice's own copy of its prompt's partial last page."""
    spec.compiles["copy_page"] += 1
    return _settle(spec, state.replace(cache=state.cache.copy_page(src, dst)))


@functools.partial(_jit, static_argnames=("spec",))
def insert(spec: StepSpec, state: DecodeState, slot, logits, row: dict, position, max_tokens, stop_on_eos, adapter):
    """Start a sequence in `slot`: its sampling row (`SamplingState.host_row`), its first token sampled
    from the prompt's last logits [V], its position, token budget and LoRA adapter."""
    spec.compiles["insert"] += 1
    sampling = state.sampling.write(slot, row)
    one = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), sampling)
    token, lp, top_ids, top_lp = sample(logits[None], one)
    sampling = sampling.replace(counts=sampling.counts.at[slot, token[0]].add(1), step=sampling.step.at[slot].add(1))
    done = (max_tokens <= 1) | (stop_on_eos & _is_eos(spec, token)[0])
    slots = state.slots.write(
        slot,
        dict(
            tokens=token[0],
            positions=position,
            active=~done,
            remaining=max_tokens - 1,
            stop_on_eos=stop_on_eos,
            adapter=adapter,
        ),
    )
    out = StepOutput(token, lp, top_ids, top_lp, done[None], jnp.ones((1,), bool))
    return _settle(spec, state.replace(sampling=sampling, slots=slots), out)


@functools.partial(_jit, static_argnames=("spec",))
def resume(spec: StepSpec, state: DecodeState, slot, row: dict, token, position, max_tokens, stop_on_eos, adapter):
    """Continue a preempted sequence in `slot` from its last generated `token` at `position` (the cache
    holds everything before it): its sampling row with the counts and step it had, nothing sampled."""
    spec.compiles["resume"] += 1
    sampling = state.sampling.write(slot, row)
    slots = state.slots.write(
        slot,
        dict(
            tokens=token,
            positions=position,
            active=max_tokens > 0,
            remaining=max_tokens,
            stop_on_eos=stop_on_eos,
            adapter=adapter,
        ),
    )
    return _settle(spec, state.replace(sampling=sampling, slots=slots))


@functools.partial(_jit, static_argnames=("spec", "window", "rows"))
def forward(spec: StepSpec, params, state: DecodeState, table, lora, window: int, rows: int):
    """The model's half of a decode step for the first `rows` slots (a bucket covering every occupied one):
    each slot's last token goes into the pages of its row of `table` [slots, pages per sequence], and its
    next-token logits [rows, V] come back for `sample_step`; each slot computes with its LoRA adapter of
    the stack `lora` (None: no adapters are served). Between the two halves the host may write
    grammar masks (`set_masks`), so a constrained slot's mask is computed while the device runs this."""
    spec.compiles["forward"] += 1
    model = Transformer(spec.cfg, spec.formulation)
    seq = jax.tree.map(lambda a: a[:rows], state.slots)
    # an idle slot keeps its last request's adapter index: counted as the base, so that it does not hold the
    # step to the LoRA update (its row is computed, and ignored, either way)
    adapter = jnp.where(seq.active, seq.adapter, 0)

    def run(params, lora, cache, tokens, positions, table, adapter):  # rows [b] -> logits [b, V], K/V written
        adapters = None if lora is None else (lora, adapter)
        logits, cache = model.apply(params, tokens[:, None], positions[:, None], cache, table, window, None, adapters)
        return logits[:, 0], cache

    mesh = spec.replicated.mesh
    data = mesh.shape["data"]
    if data > 1 and rows >= SPLIT_FROM_ROWS and rows % data == 0:
        run = _split_rows(run, mesh)
    logits, cache = run(params, lora, state.cache, seq.tokens, seq.positions, table[:rows], adapter)
    return _settle(spec, state.replace(cache=cache), logits)  # replicated, as sample_step was compiled for


# From this many decode rows on, the "data" replicas split them (below it, every replica computes every row:
# the all-gather that joins the halves costs more than the rows it saves; over processes it is a gloo round
# trip of ~2-3 ms on 2 shared CPU cores)
SPLIT_FROM_ROWS = 8


def _split_rows(run, mesh):
    """`run` over the rows [b] with each "data" replica computing its own block of b / D rows: the replicas
    then exchange their rows' logits and new K/V entries in one all-gather, so that every copy of the page
    pool (each replica holds all of it: any row may use any page) stays equal."""
    data = mesh.shape["data"]

    def local(params, lora, cache, tokens, positions, table, adapter):
        block = tokens.shape[0] // data
        mine = functools.partial(
            jax.lax.dynamic_slice_in_dim, start_index=jax.lax.axis_index("data") * block, slice_size=block, axis=0
        )
        logits, written = run(params, lora, cache, mine(tokens), mine(positions), mine(table), mine(adapter))
        page, offset = write_targets(table, positions[:, None], None, cache.pages, cache.page_size)  # every row's
        k, v = written.entries(mine(page), mine(offset))
        parts = [logits, k.reshape(block, -1), v.reshape(block, -1)]
        every = jax.lax.all_gather(jnp.concatenate([p.astype(jnp.float32) for p in parts], 1), "data", tiled=True)
        logits, k_all, v_all = jnp.split(every, np.cumsum([p.shape[1] for p in parts[:-1]]), axis=1)
        cache = written.with_entries(page, offset, k_all.reshape(-1, *k.shape[1:]), v_all.reshape(-1, *v.shape[1:]))
        return logits.astype(parts[0].dtype), cache

    return jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P(), axis_names={"data"}, check_vma=False)


@functools.partial(_jit, static_argnames=("spec",))
def sample_step(spec: StepSpec, state: DecodeState, logits):
    """The sampling half of a decode step: a token for each of the first `rows` slots from `forward`'s
    logits [rows, V], under each slot's current mask; EOS and max_tokens decided here, so a finished slot
    stops without the host."""
    spec.compiles["sample"] += 1
    rows = logits.shape[0]
    seq = jax.tree.map(lambda a: a[:rows], state.slots)
    tokens, lp, top_ids, top_lp = sample(logits, jax.tree.map(lambda a: a[:rows], state.sampling))
    active = seq.active
    remaining = seq.remaining - active
    done = active & ((remaining <= 0) | (seq.stop_on_eos & _is_eos(spec, tokens)))
    # only the rows that change are written back: the state's other arrays pass through untouched (written
    # back whole, XLA copied the [slots, V] logit biases twice a step, ~0.75 ms of a 1-row step on 64 slots)
    put = lambda full, part: full.at[:rows].set(part)
    state = state.replace(
        sampling=record(state.sampling, tokens, active),  # inactive slots keep their counts and keys
        slots=state.slots.replace(
            remaining=put(state.slots.remaining, remaining),
            active=put(state.slots.active, active & ~done),
            tokens=put(state.slots.tokens, jnp.where(active, tokens, seq.tokens)),
            positions=put(state.slots.positions, seq.positions + active),
        ),
    )
    return _settle(spec, state, StepOutput(tokens, lp, top_ids, top_lp, done, active))


@functools.partial(_jit, static_argnames=("spec",))
def set_masks(spec: StepSpec, state: DecodeState, slots, masks):
    """Write grammar masks [M, ceil(V/32)] into the `allowed` rows of `slots` [M] (out of range: dropped, so
    the caller pads M to a bucket)."""
    spec.compiles["set_masks"] += 1
    allowed = state.sampling.allowed.at[slots].set(masks, mode="drop")
    return _settle(spec, state.replace(sampling=state.sampling.replace(allowed=allowed)))


@functools.partial(_jit, static_argnames=("spec",))
def release(spec: StepSpec, state: DecodeState, slot):
    """Stop decoding `slot` (a stop string matched on the host, or an abort)."""
    spec.compiles["release"] += 1
    return _settle(spec, state.replace(slots=state.slots.replace(active=state.slots.active.at[slot].set(False))))
