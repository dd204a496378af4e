"""JaxRunner: the device contract (`contract.Runner`) over the jitted steps of `steps.py`, for one model on
its mesh. It owns the decode state, executes each plan the scheduler makes (`engine.plan`) as calls of the
steps at bucketed shapes, and runs each call as the executable warm-up made ready for that shape
(`warmup.py`: compiled in parallel or loaded from an `ExecutableStore`); a shape warm-up missed falls back to
the jitted function, which traces and compiles (counted in `compiles`).

Buckets: prefill chunks of PREFILL_BUCKETS tokens (or PACKED rows x tokens for several short prompts),
attention windows of powers of two from MIN_WINDOW up to the context (whole pages), decode rows of powers
of two up to the slots (a lightly loaded server computes few rows). While a background warm-up is still
compiling, a call takes the narrowest ready shape that covers it.

The KV cache is a pool of `pages` pages of `page_size` positions; which page holds which positions of
the sequence in a slot is the plan's page table (host [slots, pages per sequence], the pool's size where
none).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.device import steps
from jaxserve.device.executables import Variant, abstract
from jaxserve.device.state import DecodeState, SamplingState
from jaxserve.device.steps import PrefillOutput, StepOutput, StepSpec
from jaxserve.engine.contract import Executed, Runner, walk
from jaxserve.engine.plan import PrefillRow, SamplePlan, Start, StepPlan
from jaxserve.engine.types import RequestError
from jaxserve.model import LoadedModel, lora
from jaxserve.sharding import named_sharding, replicated

if TYPE_CHECKING:
    from jaxserve.checkpoint.peft import Adapter
    from jaxserve.multihost.leader import Leader

PREFILL_BUCKETS = (16, 32, 64, 256)  # one row: a prompt's chunk
PACKED = ((2, 128), (4, 64), (8, 32), (16, 16))  # (rows, tokens): short whole prompts prefilled together
STATE_ONLY = (steps.copy_page, steps.resume, steps.set_masks, steps.release)  # steps returning only the state
MIN_WINDOW = 128
PAGE_SIZE = 128  # positions per page: attention takes a window a page at a time, and smaller steps cost more


def bucket_of(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class JaxRunner(Runner):
    def __init__(
        self,
        model: LoadedModel,
        slots: int,
        cache_len: int,
        eos_id: int | None,
        eos_ids: tuple[int, ...] = (),
        pages: int | None = None,
        page_size: int = PAGE_SIZE,
        max_loras: int = 0,
        max_lora_rank: int = 16,
    ):
        """Generations end at `eos_id` (None: never) and at any of `eos_ids` (further end ids). The pool
        holds `pages` pages (None: every slot's whole context). Up to `max_loras` LoRA adapters of rank up
        to `max_lora_rank` are resident at once (0: none, and the steps compute the base alone)."""
        self.model, self.cfg = model, model.cfg
        self.slots, self.cache_len = slots, cache_len
        self.vocab_size = self.cfg.vocab_size
        primary = () if eos_id is None else (eos_id,)
        self.eos_ids = primary + tuple(sorted(set(eos_ids) - set(primary)))
        self.page_size = min(page_size, cache_len)
        self.pages_per_seq = -(-cache_len // self.page_size)
        self.pages = slots * self.pages_per_seq if pages is None else pages
        span = self.pages_per_seq * self.page_size  # the widest window: whole pages covering the context
        windows = (max(MIN_WINDOW, self.page_size) << i for i in range(20))
        self.windows = tuple(w for w in windows if w < span and w % self.page_size == 0) + (span,)
        self.row_buckets = tuple(r for r in (1 << i for i in range(20)) if r < slots) + (slots,)
        self.prefill_buckets = tuple(b for b in PREFILL_BUCKETS if b < cache_len) or (cache_len,)
        self.chunk = self.prefill_buckets[-1]
        sharding = DecodeState.shardings(self.cfg, model.mesh, slots, self.pages, self.page_size)
        self.spec = StepSpec(self.cfg, model.formulation, self.eos_ids, sharding, replicated(model.mesh))
        self._initial = jax.jit(
            lambda: DecodeState.initial(self.cfg, slots, self.pages, self.page_size), out_shardings=sharding
        )
        self.state: DecodeState = self._initial()
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.lora: dict | None = self._lora_stack() if max_loras else None
        self._compiled: dict[tuple, jax.stages.Compiled] = {}  # (step's name, statics, shape) -> executable
        self._recording: dict[tuple, Variant] | None = None  # while warm-up lists the variants
        self._pending: set[tuple] = set()  # keys still compiling after warm-up returned
        self.background: threading.Thread | None = None  # compiling them (see warmup.py)
        self.stop = threading.Event()  # set: compile no more in the background
        self._logits: jax.Array | None = None  # the last plan's decode logits, for sample_tokens
        self.group: Leader | None = None  # process 0 of a group: ships every plan to the others before it runs
        self._ship_sample = False  # the last plan's SamplePlan goes to the others (it may carry masks)

    def empty_table(self) -> np.ndarray:
        """A page table [slots, pages per sequence] with no pages (every entry the pool's size)."""
        return np.full((self.slots, self.pages_per_seq), self.pages, np.int32)

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

    def execute(self, plan: StepPlan) -> Executed:
        if self.group is not None:
            self.group.step(plan)  # the others sample at once where no masks can follow (see multihost.follower)
            self._ship_sample = plan.decode is not None and plan.decode.masks
        executed, self._logits = walk(plan, self)
        return executed

    def sample_tokens(self, plan: SamplePlan) -> StepOutput:
        if self.group is not None and self._ship_sample:
            self.group.sample(plan)
        assert self.group is None or self._ship_sample or not plan.slots, "masks the StepPlan did not announce"
        if plan.slots:
            self.set_masks(list(plan.slots), list(plan.masks))
        logits, self._logits = self._logits, None
        assert logits is not None, "a SamplePlan follows a StepPlan with a decode"
        return self.sample(logits)

    # ---- the steps, at bucketed shapes ------------------------------------------------------------

    def packing(self, count: int, longest: int) -> tuple[int, int] | None:
        for P, T in PACKED:
            if P >= count and T >= longest and T < self.cache_len and self._prefill_window((P, T), 0) is not None:
                return P, T
        return None

    def prefill(self, rows: list[PrefillRow], table: np.ndarray, score: bool = False) -> PrefillOutput:
        longest = max(len(r.tokens) for r in rows)
        if len(rows) == 1:
            # the chunk's bucket, or (while warm-up is still compiling) a longer one that is ready: the last
            # bucket at the widest window always is
            start = rows[0].start
            for T in self.prefill_buckets[self.prefill_buckets.index(bucket_of(longest, self.prefill_buckets)) :]:
                if (window := self._prefill_window((1, T), start)) is not None:
                    return self._prefill((1, T), window, rows, table, score)
            raise AssertionError("the widest prefill is always ready")
        assert all(r.start == 0 for r in rows), "only whole prompts are packed"
        shape = self.packing(len(rows), longest)
        assert shape is not None, "the scheduler packs only prompts that fit"
        window = self._prefill_window(shape, 0)
        assert window is not None
        return self._prefill(shape, window, rows, table, score)

    def _prefill_window(self, shape: tuple[int, int], start: int) -> int | None:
        """The window a prefill of `shape` (P, T) from `start` runs at: the one covering the padded chunk, or
        every page where the padding runs past the last one (the real tokens never do; padding there has no
        page); while warm-up is still compiling, the narrowest ready one from there, None if none is."""
        need = self.window_for(min(start + shape[1], self.windows[-1]) - 1)
        return next((w for w in self.windows if w >= need and self._ready("prefill", (("window", w),), shape)), None)

    def _ready(self, name: str, statics: tuple, shape: tuple = ()) -> bool:
        return (name, statics, shape) not in self._pending

    def _prefill(
        self, shape: tuple[int, int], window: int, rows: list[PrefillRow], table, score: bool
    ) -> PrefillOutput:
        P, T = shape
        tokens = np.zeros((P, T), np.int32)
        targets = np.zeros((P, T), np.int32)
        starts = np.zeros((P,), np.int32)
        lengths = np.ones((P,), np.int32)
        write_from = np.zeros((P,), np.int32)
        adapter = np.zeros((P,), np.int32)
        pages = np.full((P, self.pages_per_seq), self.pages, np.int32)  # padding rows have no pages
        for i, r in enumerate(rows):
            tokens[i, : len(r.tokens)] = r.tokens
            targets[i, : len(r.targets)] = r.targets
            starts[i], lengths[i], write_from[i] = r.start, len(r.tokens), r.write_from
            pages[i], adapter[i] = table[r.slot], r.adapter
        self.state, out = self._call(
            steps.prefill,
            dict(window=window),
            self.model.params,
            self.state,
            tokens,
            starts,
            lengths,
            pages,
            write_from,
            targets,
            np.bool_(score),
            adapter,
            self.lora,
        )
        return out

    def copy_page(self, src: int, dst: int) -> None:
        self.state = self._call(steps.copy_page, {}, self.state, np.int32(src), np.int32(dst))

    def insert(self, start: Start, logits) -> StepOutput:
        """Start decoding `start` in its slot, its first token sampled from `logits` (a row of a prefill's)."""
        row = SamplingState.host_row(start.params, self.cfg.vocab_size)
        if start.mask is not None:
            row["allowed"] = np.asarray(start.mask, np.int32)
        self.state, out = self._call(
            steps.insert,
            {},
            self.state,
            np.int32(start.slot),
            logits,
            row,
            np.int32(start.position),
            np.int32(start.max_tokens),
            np.bool_(start.stop_on_eos),
            np.int32(start.adapter),
        )
        return out

    def resume(self, start: Start) -> None:
        """Go on decoding a preempted sequence as if never interrupted: its token counts and step from the
        tokens it had generated, the last of which (`start.token`) is the next step's input."""
        row = SamplingState.host_row(start.params, self.cfg.vocab_size)
        row["counts"] = np.bincount(start.generated, minlength=self.cfg.vocab_size).astype(np.int32)
        row["step"] = np.asarray(len(start.generated), np.int32)
        if start.mask is not None:
            row["allowed"] = np.asarray(start.mask, np.int32)
        self.state = self._call(
            steps.resume,
            {},
            self.state,
            np.int32(start.slot),
            row,
            np.int32(start.token),
            np.int32(start.position),
            np.int32(start.max_tokens),
            np.bool_(start.stop_on_eos),
            np.int32(start.adapter),
        )

    @property
    def pending_variants(self) -> int:
        """Step variants a background warm-up is still compiling (0: every shape is ready)."""
        return len(self._pending)

    def forward(self, table: np.ndarray, max_position: int, max_slot: int) -> jax.Array:
        window, rows = self.window_for(max_position), bucket_of(max_slot + 1, self.row_buckets)
        if self._pending:  # warm-up is still compiling: the narrowest ready step covering both whose sampling
            # half is ready too (the widest is)
            window, rows = next(
                (w, r)
                for w in self.windows
                if w >= window
                for r in self.row_buckets
                if r >= rows
                and self._ready("forward", (("window", w), ("rows", r)), table.shape)
                and self._ready("sample_step", (), (r, self.vocab_size))
            )
        self.state, logits = self._call(
            steps.forward,
            dict(window=window, rows=rows),
            self.model.params,
            self.state,
            np.array(table, np.int32),  # a copy: the caller edits its table while this step runs
            self.lora,
        )
        return logits

    def sample(self, logits) -> StepOutput:
        self.state, out = self._call(steps.sample_step, {}, self.state, logits)
        return out

    def set_masks(self, slots: list[int], masks: list[np.ndarray]) -> None:
        M = next(m for m in self.row_buckets if m >= len(slots) and self._ready("set_masks", (), (m,)))
        padded = np.full((M,), self.slots, np.int32)  # out of range: padding rows write nothing
        padded[: len(slots)] = slots
        words = np.full((M, (self.vocab_size + 31) // 32), -1, np.int32)
        words[: len(masks)] = masks
        self.state = self._call(steps.set_masks, {}, self.state, padded, words)

    def release(self, slot: int) -> None:
        self.state = self._call(steps.release, {}, self.state, np.int32(slot))

    def stats(self) -> dict:
        f = self.model.formulation
        return {
            "compiles": sum(self.compiles.values()),
            "variants_pending": self.pending_variants,
            "formulation": f.describe(self.cfg),
            "kernel_below_rows": f.kernel_below_rows,
            "bf16_from_rows": f.bf16_from_rows,
        }

    def idle(self) -> None:
        if self.group is not None:
            self.group.idle()

    def fetch(self, result):
        return jax.device_get(result)

    # ---- LoRA adapters -----------------------------------------------------------------------------

    def _lora_stack(self) -> dict:
        """The adapter stack, zeros, on the mesh; and its writer, compiled now so that no load compiles."""
        shapes = lora.stack_shapes(self.cfg, self.max_loras, self.max_lora_rank)
        mesh = self.model.mesh
        shardings = {
            t: tuple(named_sharding(ax, s.shape, mesh) for ax, s in zip(lora.stack_axes()[t], pair))
            for t, pair in shapes.items()
        }

        def write(stack, index, entry):
            self.spec.compiles["write_adapter"] += 1
            return lora.write(stack, index, entry)

        entry = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), lora.entry({}, self.cfg, self.max_lora_rank)
        )
        index = jax.ShapeDtypeStruct((), jnp.int32)
        self._write_adapter = jax.jit(write, out_shardings=shardings).lower(shapes, index, entry).compile()
        zeros = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), out_shardings=shardings)
        return zeros()

    def read_adapter(self, name: str, path: str) -> Adapter:
        """The PEFT adapter in directory `path`, checked against this model (host work, any thread)."""
        # imported here: the device half loads no checkpoint format (and so no orbax) until an adapter is read
        from jaxserve.checkpoint.peft import AdapterError, read_adapter

        try:
            return read_adapter(path, name, self.cfg, self.max_lora_rank)
        except AdapterError as e:
            raise RequestError(str(e), "lora_path") from None

    def load_adapter(self, index: int, adapter: Adapter) -> None:
        """Write `adapter` into the stack as adapter index `index` (1..max_loras), which no slot uses now.
        Any thread: the stack is replaced, not updated in place, so a step in flight keeps the one it
        was given; shapes never change, so nothing compiles."""
        assert self.lora is not None and 1 <= index <= self.max_loras, index
        entry = lora.entry(adapter.weights, self.cfg, self.max_lora_rank)
        self.lora = self._write_adapter(self.lora, np.int32(index - 1), entry)

    # ---- compiling ---------------------------------------------------------------------------------

    def _call(self, fn, statics: dict, *args):
        """Step `fn` of steps.py on `args`: its executable from warm-up, or (a shape warm-up did not reach)
        the jitted function, which traces and compiles it (counted in `compiles`). While warm-up records,
        nothing runs: the variant is noted and the state comes back unchanged."""
        arrays = (np.ndarray, jax.Array, jax.ShapeDtypeStruct)  # the first one's shape tells variants apart
        key = (fn.__name__, tuple(statics.items()), next((a.shape for a in args if isinstance(a, arrays)), ()))
        if self._recording is not None:
            if key not in self._recording:
                self._recording[key] = Variant(fn, key[1], jax.tree.map(abstract, args))
            return self.state if fn in STATE_ONLY else (self.state, None)
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled(*args)
        return fn(self.spec, *args, **statics)

    def record(self, calls) -> dict[tuple, Variant]:
        """The step variants `calls()` (which calls this runner's steps) reaches, by key, with nothing run."""
        self._recording = {}
        try:
            calls()
            return self._recording
        finally:
            self._recording = None

    def defer(self, keys: set[tuple]) -> None:
        """These variants are still compiling: until each is `ready`, calls take the narrowest ready shape."""
        self._pending = set(keys)

    def ready(self, key: tuple, compiled: jax.stages.Compiled) -> None:
        """The executable of `key` is here: calls of that shape run it from now on."""
        self._compiled[key] = compiled
        self._pending.discard(key)  # after the executable is in: a caller seeing it ready finds it
