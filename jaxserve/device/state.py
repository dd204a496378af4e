"""The decode state on device, declared once.

Every array that lives from one step to the next is declared here exactly once: the KV page pool (its
declaration is the model's, `KVCache` or an attention kernel's layout, `kv_cache_for`; the page tables live on
the host and come with each call), then one row per slot [B, ...] for the sequence in each slot (`SlotState`)
and for its sampling knobs (`SamplingState`). A row's declaration gives its dtype, the dims after B, its value
in a free slot, and for a knob how a new sequence's value comes from its `SamplingParams`. Zeros, abstract
shapes, logical axes (hence shardings) and the row written into a slot at insertion all follow from these
declarations, so a new per-slot knob is one line here plus its use in `sampling.sample`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxserve.engine.types import SamplingParams
from jaxserve.model import KVCache, ModelConfig, kv_cache_for
from jaxserve.model.attention_kernels import GpuKVCache, TpuKVCache
from jaxserve.sharding import tree_shardings

VOCAB = "vocab"  # a row dim of the model's vocabulary size
VOCAB_WORDS = "vocab_words"  # a row dim of ceil(vocab / 32): one bit per token, packed in int32 words


def _dim(d, vocab: int) -> int:
    return vocab if d == VOCAB else (vocab + 31) // 32 if d == VOCAB_WORDS else d


@dataclasses.dataclass(frozen=True)
class Row:
    """One per-slot array [B, *tail]."""

    dtype: Any
    tail: tuple = ()  # dims after B: ints, or VOCAB
    init: float | int = 0  # a free slot's value, and a new sequence's unless `of` gives one
    of: Callable[[SamplingParams, int], Any] | None = None  # a new sequence's value from (params, vocab)


def row(dtype, tail: tuple = (), init: float | int = 0, of: Callable | None = None):
    """Declare a dataclass field as a per-slot row."""
    return dataclasses.field(metadata={"row": Row(dtype, tail, init, of)})


class Rows:
    """Behaviour shared by dataclasses whose every field is a `row`: shapes, axes, zeros, slot writes."""

    @classmethod
    def rows(cls) -> dict[str, Row]:
        return {f.name: f.metadata["row"] for f in dataclasses.fields(cls)}

    @classmethod
    def abstract(cls, slots: int, vocab: int):
        """jax.ShapeDtypeStruct per row."""
        return cls(
            **{
                name: jax.ShapeDtypeStruct((slots, *(_dim(d, vocab) for d in r.tail)), jnp.dtype(r.dtype))
                for name, r in cls.rows().items()
            }
        )

    @classmethod
    def axes(cls):
        """Logical axes per row: vocabulary dims on "vocab", others (slots too) unsharded. Slots are not split
        over "data": every data replica holds every row, so slicing the first `rows` and sampling them needs
        no collective (over processes each one is a gloo round trip); `steps.forward` splits the rows of a
        large decode step over "data" itself."""
        return cls(**{name: (None, *(VOCAB if d == VOCAB else None for d in r.tail)) for name, r in cls.rows().items()})

    @classmethod
    def initial(cls, slots: int, vocab: int):
        """Every slot free."""
        shapes = cls.abstract(slots, vocab)
        return cls(
            **{
                name: jnp.full(getattr(shapes, name).shape, r.init, getattr(shapes, name).dtype)
                for name, r in cls.rows().items()
            }
        )

    @classmethod
    def host_row(cls, params: SamplingParams, vocab: int) -> dict[str, np.ndarray]:
        """A new sequence's values of the rows that come from its params (built on the host)."""
        return {
            name: np.asarray(r.of(params, vocab), jnp.dtype(r.dtype))
            for name, r in cls.rows().items()
            if r.of is not None
        }

    def write(self, slot, values: dict):
        """Slot `slot` takes `values` (traced, by row name); every other row goes back to its initial value."""
        return self.replace(
            **{name: getattr(self, name).at[slot].set(values.get(name, r.init)) for name, r in self.rows().items()}
        )


def _dense_bias(p: SamplingParams, vocab: int) -> np.ndarray:
    bias = np.zeros((vocab,), np.float32)
    for token, value in p.logit_bias:
        bias[token] = value
    return bias


def _all_allowed(p: SamplingParams, vocab: int) -> np.ndarray:
    return np.full(((vocab + 31) // 32,), -1, np.int32)


def _seed_key(p: SamplingParams, vocab: int) -> np.ndarray:
    """jax.random.key(seed)'s data for the default threefry2x32 keys ([0, seed] for a 32-bit seed), made on
    the host: jax.random.key would queue behind the decode steps in flight and hold the scheduler for a
    step (~60 ms of each seeded request's first token, served at one stream)."""
    return np.array([0, p.seed & 0xFFFFFFFF], np.uint32)


@struct.dataclass
class SamplingState(Rows):
    """Each slot's sampling knobs, and what sampling keeps between steps."""

    temperature: jax.Array = row(jnp.float32, of=lambda p, _: p.temperature)
    top_p: jax.Array = row(jnp.float32, init=1.0, of=lambda p, _: p.top_p)
    presence: jax.Array = row(jnp.float32, of=lambda p, _: p.presence_penalty)
    frequency: jax.Array = row(jnp.float32, of=lambda p, _: p.frequency_penalty)
    bias: jax.Array = row(jnp.float32, tail=(VOCAB,), of=_dense_bias)  # dense logit_bias
    counts: jax.Array = row(jnp.int32, tail=(VOCAB,))  # how often each token was generated in this sequence
    key: jax.Array = row(jnp.uint32, tail=(2,), of=_seed_key)  # the sequence's base key (raw key data)
    step: jax.Array = row(jnp.int32)  # tokens sampled so far: folded into the key, so draws depend on nothing else
    # the tokens the next draw may pick, one bit each (a grammar's mask, written by the host before each step
    # of a constrained slot); all ones for a free or unconstrained slot
    allowed: jax.Array = row(jnp.int32, tail=(VOCAB_WORDS,), init=-1, of=_all_allowed)


@struct.dataclass
class SlotState(Rows):
    """The sequence in each slot; all written together when a sequence is inserted."""

    tokens: jax.Array = row(jnp.int32)  # the last token: the next step's input
    positions: jax.Array = row(jnp.int32)  # that token's position
    active: jax.Array = row(jnp.bool_)  # decoding; a free or finished slot is not
    remaining: jax.Array = row(jnp.int32)  # tokens still allowed (max_tokens)
    stop_on_eos: jax.Array = row(jnp.bool_)
    adapter: jax.Array = row(jnp.int32)  # its LoRA adapter: 0 none (the base), i the adapter stack's entry i - 1


@struct.dataclass
class DecodeState:
    cache: KVCache | TpuKVCache | GpuKVCache  # the page pool, in the layout of cfg.attention
    slots: SlotState
    sampling: SamplingState

    @staticmethod
    def abstract(cfg: ModelConfig, slots: int, pages: int, page_size: int) -> DecodeState:
        return DecodeState(
            cache=kv_cache_for(cfg).shape_dtype(cfg, pages, page_size),
            slots=SlotState.abstract(slots, cfg.vocab_size),
            sampling=SamplingState.abstract(slots, cfg.vocab_size),
        )

    @staticmethod
    def axes(cfg: ModelConfig) -> DecodeState:
        return DecodeState(cache=kv_cache_for(cfg).axes(), slots=SlotState.axes(), sampling=SamplingState.axes())

    @staticmethod
    def initial(cfg: ModelConfig, slots: int, pages: int, page_size: int) -> DecodeState:
        return DecodeState(
            cache=kv_cache_for(cfg).zeros(cfg, pages, page_size),
            slots=SlotState.initial(slots, cfg.vocab_size),
            sampling=SamplingState.initial(slots, cfg.vocab_size),
        )

    @staticmethod
    def shardings(cfg: ModelConfig, mesh, slots: int, pages: int, page_size: int) -> DecodeState:
        return tree_shardings(DecodeState.axes(cfg), DecodeState.abstract(cfg, slots, pages, page_size), mesh)
