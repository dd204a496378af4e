"""JaxCore: the device contract (`contract.Core`) over the jitted steps of `steps.py`, for one model on
its mesh. It owns the decode state, turns host arguments into bucketed shapes, and compiles every
bucket in `warmup()`.

Buckets: prefill chunks of PREFILL_BUCKETS tokens (or PACKED rows x tokens for several short prompts),
attention windows of powers of two from MIN_WINDOW up to the cache length, decode rows of powers of two
up to the slots (a lightly loaded server computes few rows).
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from jaxserve.checkpoint import LoadedModel
from jaxserve.engine import steps
from jaxserve.engine.contract import Core, PrefillRow
from jaxserve.engine.state import DecodeState, SamplingState
from jaxserve.engine.steps import PrefillOutput, StepOutput, StepSpec
from jaxserve.engine.types import SamplingParams
from jaxserve.sharding import replicated

log = logging.getLogger(__name__)

PREFILL_BUCKETS = (16, 32, 64, 256)  # one row: a prompt's chunk
PACKED = ((2, 128), (4, 64), (8, 32), (16, 16))  # (rows, tokens): short whole prompts prefilled together
MIN_WINDOW = 128


def bucket_of(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class JaxCore(Core):
    def __init__(
        self, model: LoadedModel, slots: int, cache_len: int, eos_id: int | None, eos_ids: tuple[int, ...] = ()
    ):
        """Generations end at `eos_id` (None: never) and at any of `eos_ids` (further end ids)."""
        self.model, self.cfg = model, model.cfg
        self.slots, self.cache_len = slots, cache_len
        self.vocab_size = self.cfg.vocab_size
        primary = () if eos_id is None else (eos_id,)
        self.eos_ids = primary + tuple(sorted(set(eos_ids) - set(primary)))
        self.windows = tuple(w for w in (MIN_WINDOW << i for i in range(20)) if w < cache_len) + (cache_len,)
        self.row_buckets = tuple(r for r in (1 << i for i in range(20)) if r < slots) + (slots,)
        self.prefill_buckets = tuple(b for b in PREFILL_BUCKETS if b < cache_len) or (cache_len,)
        self.chunk = self.prefill_buckets[-1]
        sharding = DecodeState.shardings(self.cfg, model.mesh, slots, cache_len)
        self.spec = StepSpec(self.cfg, self.eos_ids, sharding, replicated(model.mesh))
        self._initial = jax.jit(lambda: DecodeState.initial(self.cfg, slots, cache_len), out_shardings=sharding)
        self.state: DecodeState = self._initial()

    @property
    def compiles(self):
        """Traces of each step so far (steps are shared by cores of equal specs)."""
        return self.spec.compiles

    @property
    def kv_bytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self.state.cache))

    def window_for(self, max_position: int) -> int:
        return bucket_of(max_position + 1, self.windows)

    # ---- the contract ------------------------------------------------------------------------------

    def packing(self, count: int, longest: int) -> tuple[int, int] | None:
        for P, T in PACKED:
            if P >= count and T >= longest and T < self.cache_len:
                return P, T
        return None

    def prefill(self, rows: list[PrefillRow], score: bool = False) -> PrefillOutput:
        longest = max(len(r.tokens) for r in rows)
        if len(rows) == 1:
            return self._prefill((1, bucket_of(longest, self.prefill_buckets)), rows, score)
        assert all(r.start == 0 for r in rows), "only whole prompts are packed"
        shape = self.packing(len(rows), longest)
        assert shape is not None, "the scheduler packs only prompts that fit"
        return self._prefill(shape, rows, score)

    def _prefill(self, shape: tuple[int, int], rows: list[PrefillRow], score: bool) -> PrefillOutput:
        P, T = shape
        tokens = np.zeros((P, T), np.int32)
        targets = np.zeros((P, T), np.int32)
        starts = np.zeros((P,), np.int32)
        lengths = np.ones((P,), np.int32)
        slots = np.full((P,), self.slots, np.int32)  # out of range: padding rows write nothing
        for i, r in enumerate(rows):
            tokens[i, : len(r.tokens)] = r.tokens
            targets[i, : len(r.targets)] = r.targets
            starts[i], lengths[i], slots[i] = r.start, len(r.tokens), r.slot
        # the window covers the padded chunk, or the whole cache where the padding runs past its end (the
        # real tokens never do; padding there is dropped): a shape warmup() has compiled either way
        window = self.window_for(min(int(starts.max()) + T, self.cache_len) - 1)
        self.state, out = steps.prefill(
            self.spec, self.model.params, self.state, tokens, starts, lengths, slots, targets, np.bool_(score), window
        )
        return out

    def fork(self, src: int, dst: int, length: int) -> None:
        self.state = steps.fork(self.spec, self.state, np.int32(src), np.int32(dst), self.window_for(length - 1))

    def insert(
        self,
        slot: int,
        logits,
        params: SamplingParams,
        position: int,
        max_tokens: int,
        stop_on_eos: bool,
        mask: np.ndarray | None = None,
    ) -> StepOutput:
        row = SamplingState.host_row(params, self.cfg.vocab_size)
        if mask is not None:
            row["allowed"] = np.asarray(mask, np.int32)
        self.state, out = steps.insert(
            self.spec,
            self.state,
            np.int32(slot),
            logits,
            row,
            np.int32(position),
            np.int32(max_tokens),
            np.bool_(stop_on_eos),
        )
        return out

    def forward(self, max_position: int, max_slot: int) -> jax.Array:
        self.state, logits = steps.forward(
            self.spec,
            self.model.params,
            self.state,
            self.window_for(max_position),
            bucket_of(max_slot + 1, self.row_buckets),
        )
        return logits

    def sample(self, logits: jax.Array) -> StepOutput:
        self.state, out = steps.sample_step(self.spec, self.state, logits)
        return out

    def set_masks(self, slots: list[int], masks: list[np.ndarray]) -> None:
        M = bucket_of(len(slots), self.row_buckets)
        padded = np.full((M,), self.slots, np.int32)  # out of range: padding rows write nothing
        padded[: len(slots)] = slots
        words = np.full((M, (self.vocab_size + 31) // 32), -1, np.int32)
        words[: len(masks)] = masks
        self.state = steps.set_masks(self.spec, self.state, padded, words)

    def release(self, slot: int) -> None:
        self.state = steps.release(self.spec, self.state, np.int32(slot))

    def fetch(self, result):
        return jax.device_get(result)

    # ---- compiling ---------------------------------------------------------------------------------

    def warmup(self) -> float:
        """Compile every shape a request can reach; returns seconds spent."""
        t0 = time.perf_counter()
        for T in self.prefill_buckets:
            for start in sorted({w - T for w in self.windows if w >= T}):
                out = self.prefill([PrefillRow(0, [0] * T, start, [0] * T)])
        for P, T in PACKED:
            if T < self.cache_len:
                self._prefill((P, T), [PrefillRow(0, [0] * T, 0, [0] * T)], False)
        self.insert(0, out.last_logits[0], SamplingParams(temperature=1.0, top_p=0.5), 0, 1, True)
        for rows in self.row_buckets:
            self.set_masks([self.slots] * rows, [np.full(((self.vocab_size + 31) // 32,), -1, np.int32)] * rows)
        for w in self.windows:
            self.fork(0, 0, w)
            for rows in self.row_buckets:
                self.step(w - 1, rows - 1)
        self.release(0)
        self.fetch(self.state.slots.active)
        del self.state  # drop the used state before making a fresh one: never two caches at once
        self.state = self._initial()
        log.info(
            "compiled %d variants in %.1f s (vocab %d, %d slots, windows %s, prefill buckets %s)",
            sum(self.compiles.values()),
            time.perf_counter() - t0,
            self.cfg.vocab_size,
            self.slots,
            self.windows,
            self.prefill_buckets,
        )
        return time.perf_counter() - t0
