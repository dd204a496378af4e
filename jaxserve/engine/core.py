"""EngineCore: the device side of continuous batching. The scheduler thread is its only caller.

Contract (JetStream's prefill -> insert -> generate, with the prefill writing straight into its slot):
  prefill(rows, score)                  writes prompt chunks' K/V into their slots' cache rows and returns
                                        the last position's logits, and with `score` (echo) the
                                        prompt-token logprobs;
  fork(src, dst, length)                copies a prefilled prompt to another slot (n / best_of);
  insert(slot, logits, params, ...)     samples the first token and activates the slot;
  step(max_position)                    one decode step for every slot, EOS and max_tokens decided on
                                        device, the state donated so it is updated in place;
  release(slot)                         deactivates a slot (stop string matched on the host, abort).
Every call returns device arrays at once (no host sync); `fetch` turns them into NumPy.

Shapes are bucketed: prefill chunks of PREFILL_BUCKETS tokens, attention windows of powers of two up to the
cache length. `warmup()` compiles all of them, and `compiles` counts traces so tests can prove that no
request compiles anything afterwards.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxserve.checkpoint import LoadedModel
from jaxserve.engine.sampling import (TOP_LOGPROBS, SamplingParams, SamplingRow, SamplingState, record, sample,
                                      top_logprobs, write_row)
from jaxserve.engine.steps import cache_shardings
from jaxserve.model import KVCache, Transformer
from jaxserve.sharding import named_sharding

log = logging.getLogger(__name__)

PREFILL_BUCKETS = (16, 32, 64, 256)  # one row: a prompt's chunk
PACKED = ((2, 128), (4, 64), (8, 32), (16, 16))  # (rows, tokens): short whole prompts prefilled together
MIN_WINDOW = 128


@struct.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array  # [B] the last token of each slot: the next step's input
    positions: jax.Array  # [B] that token's position
    active: jax.Array  # [B] bool
    remaining: jax.Array  # [B] tokens still allowed (max_tokens)
    stop_on_eos: jax.Array  # [B] bool
    sampling: SamplingState


@struct.dataclass
class StepOutput:
    """What one step (or one insert) produced, per slot: arrays [B] (or [1]), top_* [B, 5]."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    done: jax.Array  # the slot finished with this token (EOS or max_tokens)
    valid: jax.Array  # the slot was active: this row is a real token


@struct.dataclass
class PrefillOutput:
    logprobs: jax.Array  # [P, T] log p(targets[t] | prompt[:start+t+1]) for each row
    top_ids: jax.Array  # [P, T, 5]
    top_logprobs: jax.Array
    last_logits: jax.Array  # [P, V] at each row's last real token


def bucket_of(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class EngineCore:
    def __init__(self, model: LoadedModel, slots: int, cache_len: int, eos_id: int | None):
        self.model, self.cfg, self.mesh = model, model.cfg, model.mesh
        self.slots, self.cache_len = slots, cache_len
        self.eos_id = -1 if eos_id is None else eos_id
        self.windows = tuple(w for w in (MIN_WINDOW << i for i in range(20)) if w < cache_len) + (cache_len,)
        # decode steps cover the first 1, 2, 4, ... slots: a lightly loaded server computes few rows
        self.row_buckets = tuple(r for r in (1 << i for i in range(20)) if r < slots) + (slots,)
        self.prefill_buckets = tuple(b for b in PREFILL_BUCKETS if b < cache_len) or (cache_len,)
        self.chunk = self.prefill_buckets[-1]
        self.compiles: collections.Counter = collections.Counter()
        self._transformer = Transformer(self.cfg)
        self._build()
        self.state = self._make_state()

    # ---- sharding and jitted functions -------------------------------------------------------------

    def _state_shardings(self) -> DecodeState:
        B, V, mesh = self.slots, self.cfg.vocab_size, self.mesh
        row = named_sharding(("batch",), (B,), mesh)
        table = named_sharding(("batch", "vocab"), (B, V), mesh)
        keys = named_sharding(("batch", None), (B, 2), mesh)
        sampling = SamplingState(temperature=row, top_p=row, presence=row, frequency=row, bias=table,
                                 counts=table, key=keys, step=row)
        return DecodeState(cache=cache_shardings(self.cfg, mesh, B, self.cache_len), tokens=row, positions=row,
                           active=row, remaining=row, stop_on_eos=row, sampling=sampling)

    def _build(self):
        params_sh = self.model.param_shardings
        state_sh = self._state_shardings()
        self._state_sharding = state_sh
        model, eos = self._transformer, self.eos_id

        def counted(name, fn):
            def traced(*args):
                self.compiles[name] += 1  # runs once per compilation (tracing), never per call
                return fn(*args)
            return traced

        def prefill(params, state, tokens, starts, lengths, slots, targets, score, window):
            P, T = tokens.shape
            positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
            x, cache = model.apply(params, tokens, positions, state.cache, window, slots=slots, method="hidden")
            last = jnp.maximum(lengths - 1, 0)

            def every_position(x):  # echo: logprobs of every prompt token
                logits = model.apply(params, x, method="logits")
                logprobs, top_ids, top_lp = top_logprobs(logits)
                chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
                return PrefillOutput(logprobs=chosen, top_ids=top_ids, top_logprobs=top_lp,
                                     last_logits=logits[jnp.arange(P), last])

            def last_position(x):  # the logits for [T, V] and their top-5 cost a third of a short prefill
                logits = model.apply(params, x[jnp.arange(P), last][:, None], method="logits")[:, 0]
                return PrefillOutput(logprobs=jnp.zeros((P, T)), top_ids=jnp.zeros((P, T, TOP_LOGPROBS), jnp.int32),
                                     top_logprobs=jnp.zeros((P, T, TOP_LOGPROBS)), last_logits=logits)

            return state.replace(cache=cache), jax.lax.cond(score, every_position, last_position, x)

        def fork(state, src, dst, window):
            return state.replace(cache=state.cache.copy_slot(src, dst, window))

        def insert(state, slot, logits, row, position, max_tokens, stop_on_eos):
            sampling = write_row(state.sampling, slot, row)
            one = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), sampling)
            token, lp, top_ids, top_lp = sample(logits[None], one)
            sampling = sampling.replace(counts=sampling.counts.at[slot, token[0]].add(1),
                                        step=sampling.step.at[slot].add(1))
            done = (max_tokens <= 1) | (stop_on_eos & (token[0] == eos))
            state = state.replace(
                sampling=sampling, tokens=state.tokens.at[slot].set(token[0]),
                positions=state.positions.at[slot].set(position), active=state.active.at[slot].set(~done),
                remaining=state.remaining.at[slot].set(max_tokens - 1),
                stop_on_eos=state.stop_on_eos.at[slot].set(stop_on_eos))
            return state, StepOutput(token, lp, top_ids, top_lp, done[None], jnp.ones((1,), bool))

        def step(params, state, window, rows):
            """Decode the first `rows` slots (a static bucket covering every occupied slot)."""
            head = lambda a: a[:rows]  # noqa: E731
            s = jax.tree.map(head, state.replace(cache=None))
            logits, cache = model.apply(params, s.tokens[:, None], s.positions[:, None], state.cache, window)
            tokens, lp, top_ids, top_lp = sample(logits[:, 0], s.sampling)
            active = s.active
            sampling = record(s.sampling, tokens, active)  # inactive slots keep their counts and keys
            remaining = s.remaining - active
            done = active & ((remaining <= 0) | (s.stop_on_eos & (tokens == eos)))
            s = s.replace(sampling=sampling, remaining=remaining, active=active & ~done,
                          tokens=jnp.where(active, tokens, s.tokens), positions=s.positions + active)
            state = jax.tree.map(lambda full, part: full.at[:rows].set(part), state.replace(cache=None), s)
            return state.replace(cache=cache), StepOutput(tokens, lp, top_ids, top_lp, done, active)

        def release(state, slot):
            return state.replace(active=state.active.at[slot].set(False))

        B, cfg = self.slots, self.cfg

        def make_state():
            z = jnp.zeros((B,), jnp.int32)
            return DecodeState(cache=KVCache.zeros(cfg, B, self.cache_len), tokens=z, positions=z,
                               active=jnp.zeros((B,), bool), remaining=z, stop_on_eos=jnp.zeros((B,), bool),
                               sampling=SamplingState.zeros(B, cfg.vocab_size))

        self._make_state = jax.jit(make_state, out_shardings=state_sh)
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._prefill = jax.jit(counted("prefill", prefill), static_argnums=(8,), donate_argnums=(1,),
                                in_shardings=(params_sh, state_sh, rep, rep, rep, rep, rep, rep),
                                out_shardings=(state_sh, rep))
        self._fork = jax.jit(counted("fork", fork), static_argnums=(3,), donate_argnums=(0,),
                             in_shardings=(state_sh, rep, rep), out_shardings=state_sh)
        self._insert = jax.jit(counted("insert", insert), donate_argnums=(0,),
                               in_shardings=(state_sh, rep, rep, rep, rep, rep, rep), out_shardings=(state_sh, rep))
        self._step = jax.jit(counted("step", step), static_argnums=(2, 3), donate_argnums=(1,),
                             in_shardings=(params_sh, state_sh), out_shardings=(state_sh, rep))
        self._release = jax.jit(counted("release", release), donate_argnums=(0,), in_shardings=(state_sh, rep),
                                out_shardings=state_sh)

    def window_for(self, max_position: int) -> int:
        return bucket_of(max_position + 1, self.windows)

    # ---- the contract ------------------------------------------------------------------------------

    def packing(self, count: int, longest: int) -> tuple[int, int] | None:
        """The packed shape (rows, tokens) for `count` whole prompts of at most `longest` tokens, or None."""
        for P, T in PACKED:
            if P >= count and T >= longest and T < self.cache_len:
                return P, T
        return None

    def prefill(self, rows: list[tuple[int, list[int], int, list[int]]], score: bool = False) -> PrefillOutput:
        """Prefill rows of (slot, chunk, start, targets) in one call: one row of any chunk, or several
        whole prompts packed (start 0). Output rows follow `rows`; padding rows write nothing. Without
        `score` only last_logits is computed (the prompt logprobs come back zero)."""
        longest = max(len(chunk) for _, chunk, _, _ in rows)
        if len(rows) == 1:
            P, T = 1, bucket_of(longest, self.prefill_buckets)
        else:
            assert all(start == 0 for _, _, start, _ in rows)
            P, T = self.packing(len(rows), longest)
        return self._prefill_rows(P, T, rows, score)

    def _prefill_rows(self, P: int, T: int, rows, score: bool = False) -> PrefillOutput:
        tokens = np.zeros((P, T), np.int32)
        targets = np.zeros((P, T), np.int32)
        starts = np.zeros((P,), np.int32)
        lengths = np.ones((P,), np.int32)
        slots = np.full((P,), self.slots, np.int32)  # out of range: writes are dropped
        for i, (slot, chunk, start, tgt) in enumerate(rows):
            tokens[i, : len(chunk)] = chunk
            targets[i, : len(tgt)] = tgt
            starts[i], lengths[i], slots[i] = start, len(chunk), slot
        window = self.window_for(int(starts.max()) + T - 1)
        self.state, out = self._prefill(self.model.params, self.state, tokens, starts, lengths, slots, targets,
                                        np.bool_(score), window)
        return out

    def fork(self, src: int, dst: int, length: int) -> None:
        self.state = self._fork(self.state, np.int32(src), np.int32(dst), self.window_for(length - 1))

    def insert(self, slot: int, logits, params: SamplingParams, position: int, max_tokens: int,
               stop_on_eos: bool) -> StepOutput:
        row = SamplingRow.from_params(params, self.cfg.vocab_size)
        self.state, out = self._insert(self.state, np.int32(slot), logits, row, np.int32(position),
                                       np.int32(max_tokens), np.bool_(stop_on_eos))
        return out

    def step(self, max_position: int, max_slot: int) -> StepOutput:
        """Decode every active slot; `max_position` / `max_slot` bound the occupied ones. Output rows cover
        the first slots only (at least max_slot + 1 of them)."""
        self.state, out = self._step(self.model.params, self.state, self.window_for(max_position),
                                     bucket_of(max_slot + 1, self.row_buckets))
        return out

    def release(self, slot: int) -> None:
        self.state = self._release(self.state, np.int32(slot))

    @staticmethod
    def fetch(tree):
        return jax.device_get(tree)

    def warmup(self) -> float:
        """Compile every shape a request can reach; returns seconds spent."""
        t0 = time.perf_counter()
        vocab = self.cfg.vocab_size
        for T in self.prefill_buckets:
            for start in sorted({w - T for w in self.windows if w >= T}):
                out = self.prefill([(0, [0] * T, start, [0] * T)])
        for P, T in PACKED:
            if T < self.cache_len:
                self._prefill_rows(P, T, [(0, [0] * T, 0, [0] * T)])
        self.insert(0, out.last_logits[0], SamplingParams(temperature=1.0, top_p=0.5), 0, 1, True)
        for w in self.windows:
            self.fork(0, 0, w)
            for rows in self.row_buckets:
                self.step(w - 1, rows - 1)
        self.release(0)
        self.fetch(self.state.active)
        self.state = None  # drop the used state before making a fresh one: never two caches at once
        self.state = self._make_state()
        log.info("compiled %d variants in %.1f s (vocab %d, %d slots, windows %s, prefill buckets %s)",
                 sum(self.compiles.values()), time.perf_counter() - t0, vocab, self.slots, self.windows,
                 self.prefill_buckets)
        return time.perf_counter() - t0
