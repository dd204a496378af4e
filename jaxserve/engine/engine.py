"""The engine: continuous batching over the slots of an EngineCore, driven by one scheduler thread.

Requests come in through `submit` (any thread) or `generate` (asyncio); the scheduler thread is the only
caller of the core. Each loop: take new requests, prefill one chunk of one prompt, dispatch a decode step
for all slots, then process the *previous* step's outputs on the host (detokenize, stop strings, deltas)
while the device runs the new one. Results go back through a callback per request (for asyncio, a
thread-safe put into an asyncio.Queue): nothing polls.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import random
import threading
from typing import AsyncIterator, Callable, Iterator

from jaxserve.engine.sampling import SamplingParams
from jaxserve.engine.text import ChoiceText
from jaxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


class ContextLengthError(ValueError):
    pass


class EngineStopped(RuntimeError):
    """The engine shut down before the request finished."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int = 16
    sampling: SamplingParams = SamplingParams()  # its seed is ignored: see `seed`
    seed: int | None = None  # None: a fresh random stream per choice
    n: int = 1
    best_of: int | None = None  # candidates generated; the n with the highest mean token logprob are returned
    echo: bool = False
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclasses.dataclass
class TokenInfo:
    token_id: int
    logprob: float | None  # None for the first prompt token
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Delta:
    index: int  # choice index, 0..n-1
    text: str
    tokens: list[TokenInfo]  # the tokens behind `text`, each with its logprob and the top 5
    finish_reason: str | None = None  # "stop" | "length" on a choice's last delta
    echo: bool = False  # the prompt itself (echo), sent before any generated text


@dataclasses.dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


_END = object()


class _Choice:
    def __init__(self, group: "_Group", index: int, tokenizer: Tokenizer, seed: int):
        self.group, self.index, self.seed = group, index, seed
        self.text = ChoiceText(tokenizer, group.req.stop)
        self.slot: int | None = None
        self.live = False  # inserted: the slot is decoding on device
        self.position = 0  # host's upper bound of the slot's position on device
        self.count = 0
        self.logprob_sum = 0.0
        self.finished = False
        self.buffer: list[Delta] = []  # best_of: everything is held until the best are known


class _Group:
    def __init__(self, req: EngineRequest, emit: Callable, tokenizer: Tokenizer):
        self.req, self.emit = req, emit
        k = max(req.n, req.best_of or req.n)
        seeds = [random.getrandbits(31) if req.seed is None else (req.seed + 1_000_003 * j) & 0xFFFFFFFF
                 for j in range(k)]
        self.choices = [_Choice(self, j, tokenizer, seeds[j]) for j in range(k)]
        self.prefilled = 0
        self.prefill_outs: list = []
        self.slots_needed = k if req.max_tokens > 0 else 1
        self.done = False

    @property
    def buffered(self) -> bool:
        return len(self.choices) > self.req.n


class Engine:
    def __init__(self, core, tokenizer: Tokenizer, max_waiting: int = 256):
        self.core, self.tokenizer = core, tokenizer
        self.max_waiting = max_waiting
        self.max_context = core.cache_len
        self._inbox: queue.Queue = queue.Queue()
        self._aborts: queue.Queue = queue.Queue()
        self._waiting: collections.deque[_Group] = collections.deque()
        self._prefilling: _Group | None = None
        self._groups: dict[str, _Group] = {}
        self._owner: list[_Choice | None] = [None] * core.slots
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.healthy = False
        self.steps = 0
        self.error: BaseException | None = None

    # ---- public API (any thread) ------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="jaxserve-scheduler", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread:
            self._thread.join(timeout)

    def validate(self, req: EngineRequest) -> None:
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        total = len(req.prompt_ids) + req.max_tokens
        if total > self.max_context:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{total} tokens ({len(req.prompt_ids)} in the prompt, {req.max_tokens} for the completion).")
        if max(req.n, req.best_of or 1) > self.core.slots:
            raise ValueError(f"n and best_of can be at most {self.core.slots} (the engine's slots)")

    def has_room(self, count: int = 1) -> bool:
        """Whether `count` more requests fit in the waiting queue now."""
        return self.queue_depth + count <= self.max_waiting

    def submit(self, req: EngineRequest, emit: Callable) -> None:
        """Queue a request; `emit` receives Delta, then Usage, then the end marker (or an exception)."""
        self.validate(req)
        if not self.has_room():
            raise QueueFull(f"{self.max_waiting} requests are already waiting")
        self._inbox.put(_Group(req, emit, self.tokenizer))

    def abort(self, request_id: str) -> None:
        self._aborts.put(request_id)

    async def generate(self, req: EngineRequest) -> AsyncIterator[Delta | Usage]:
        """Deltas as they are produced, then one Usage. Leaving early aborts the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self.submit(req, lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        finished = False
        try:
            while True:
                item = await q.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self.abort(req.request_id)

    def stream(self, req: EngineRequest, timeout: float | None = None) -> Iterator[Delta | Usage]:
        """Blocking iterator over a request's deltas, then its Usage (for threads and command lines)."""
        q: queue.Queue = queue.Queue()
        self.submit(req, q.put)
        finished = False
        try:
            while (item := q.get(timeout=timeout)) is not _END:
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
            finished = True
        finally:
            if not finished:
                self.abort(req.request_id)

    def complete(self, req: EngineRequest, timeout: float | None = None) -> tuple[list[Delta], Usage]:
        """Blocking: every delta of a request, and its usage."""
        items = list(self.stream(req, timeout))
        return [i for i in items if isinstance(i, Delta)], next(i for i in items if isinstance(i, Usage))

    @property
    def active_slots(self) -> int:
        return sum(o is not None for o in self._owner)

    @property
    def queue_depth(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    # ---- scheduler thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        pending = None  # (StepOutput, owners at dispatch) of the step in flight
        try:
            while not self._stop.is_set():
                idle = pending is None and self._prefilling is None and not self._waiting
                self._intake(block=idle and self.active_slots == 0)
                self._handle_aborts()
                inserted = self._prefill()
                dispatched = None
                occupied = [c for c in self._owner if c is not None and c.live]
                if occupied:
                    out = self.core.step(max(c.position for c in occupied), max(c.slot for c in occupied))
                    for c in occupied:
                        c.position += 1
                    dispatched = (out, list(self._owner))
                if pending is not None:
                    self._process_step(*pending)
                for choice, out in inserted:
                    self._process_token(choice, self.core.fetch(out), 0)
                pending = dispatched
                self.steps += 1
                self.healthy = True
            self._fail_all(EngineStopped("the server is shutting down"))
        except BaseException as e:  # an engine failure ends every open stream, never silently
            log.exception("engine failure")
            self.error = e
            self._fail_all(e)
        finally:
            self.healthy = False

    def _fail_all(self, error: BaseException) -> None:
        self._intake(block=False)
        for group in list(self._groups.values()) + list(self._waiting):
            if not group.done:
                group.done = True
                group.emit(error)
                group.emit(_END)
        self._groups.clear()
        self._waiting.clear()

    def _intake(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle_aborts(self) -> None:
        while True:
            try:
                request_id = self._aborts.get_nowait()
            except queue.Empty:
                return
            for group in list(self._waiting):
                if group.req.request_id == request_id:
                    self._waiting.remove(group)
                    group.emit(_END)
            group = self._groups.get(request_id)
            if group is not None:
                if self._prefilling is group:
                    self._prefilling = None
                self._end_group(group, silent=True)
                for choice in group.choices:
                    self._finish(choice, None, release=True, silent=True)

    def _free_slots(self) -> list[int]:
        return [i for i, o in enumerate(self._owner) if o is None]

    def _prefill(self) -> list:
        """One prefill call per loop iteration: several short prompts packed together, or the next chunk
        of one prompt (so a long prompt delays running streams by at most one chunk per step).
        Returns the (choice, first-token output) pairs inserted."""
        if self._prefilling is None and self._waiting:
            packed = self._admit_packed()
            if len(packed) > 1:
                rows = [(g.choices[0].slot, list(g.req.prompt_ids), 0, self._targets(g, 0, len(g.req.prompt_ids)))
                        for g in packed]
                pre = self.core.prefill(rows, score=any(g.req.echo for g in packed))
                return [pair for i, g in enumerate(packed) for pair in self._prefilled(g, pre, i)]
            if packed or self._admit(self._waiting[0]):
                self._prefilling = self._waiting.popleft() if not packed else packed[0]
        group = self._prefilling
        if group is None:
            return []
        prompt, start = group.req.prompt_ids, group.prefilled
        chunk = list(prompt[start: start + self.core.chunk])
        pre = self.core.prefill([(group.choices[0].slot, chunk, start, self._targets(group, start, len(chunk)))],
                                score=group.req.echo)
        group.prefilled += len(chunk)
        if group.req.echo:
            group.prefill_outs.append((pre, 0, len(chunk)))
        if group.prefilled < len(prompt):
            return []
        self._prefilling = None
        return self._prefilled(group, pre, 0)

    @staticmethod
    def _targets(group: _Group, start: int, length: int) -> list[int]:
        """The tokens each prompt position predicts (0 past the end), for echo logprobs."""
        prompt = group.req.prompt_ids
        return list(prompt[start + 1: start + 1 + length]) + [0] * (start + length >= len(prompt))

    def _admit(self, group: _Group) -> bool:
        """Reserve the group's slots if enough are free."""
        free = self._free_slots()
        if len(free) < group.slots_needed:
            return False
        self._groups[group.req.request_id] = group
        for choice, slot in zip(group.choices, free):
            choice.slot = slot
            self._owner[slot] = choice  # reserved; no step output reaches it before its insert
        return True

    def _admit_packed(self) -> list[_Group]:
        """Admit waiting short prompts from the front, as many as one packed prefill shape holds."""
        admitted, longest = [], 0
        free = len(self._free_slots())
        for group in list(self._waiting):
            n = len(group.req.prompt_ids)
            if group.slots_needed > free or self.core.packing(len(admitted) + 1, max(longest, n)) is None:
                break
            self._admit(group)
            self._waiting.popleft()
            admitted.append(group)
            longest, free = max(longest, n), free - group.slots_needed
        return admitted

    def _prefilled(self, group: _Group, pre, row: int) -> list:
        """The whole prompt is in the cache: echo it, then fork it to every choice's slot and insert."""
        if group.req.echo:
            if not group.prefill_outs:
                group.prefill_outs.append((pre, row, len(group.req.prompt_ids)))
            self._emit_echo(group)
        if group.req.max_tokens == 0:
            for choice in group.choices:
                self._finish(choice, "length", release=False)
            return []
        n_prompt = len(group.req.prompt_ids)
        inserted = []
        src = group.choices[0].slot
        logits = pre.last_logits[row]
        for choice in group.choices:
            if choice.slot != src:
                self.core.fork(src, choice.slot, n_prompt)
            params = dataclasses.replace(group.req.sampling, seed=choice.seed)
            out = self.core.insert(choice.slot, logits, params, n_prompt, group.req.max_tokens,
                                   not group.req.ignore_eos)
            choice.position, choice.live = n_prompt, True
            inserted.append((choice, out))
        return inserted

    def _emit_echo(self, group: _Group) -> None:
        prompt = group.req.prompt_ids
        rows = []  # row j: log p(prompt[j + 1] | prompt[:j + 1]) and the top 5 there
        for out, row, length in group.prefill_outs:
            out = self.core.fetch(out)
            rows += [(float(out.logprobs[row, t]),
                      list(zip(out.top_ids[row, t].tolist(), out.top_logprobs[row, t].tolist())))
                     for t in range(length)]
        infos = [TokenInfo(prompt[0], None, [])] + [TokenInfo(prompt[j], *rows[j - 1]) for j in range(1, len(prompt))]
        group.prefill_outs = []
        text = self.tokenizer.decode(prompt)
        for choice in group.choices:
            self._deliver(choice, Delta(choice.index, text, infos, None, echo=True))

    def _process_step(self, out, owners) -> None:
        out = self.core.fetch(out)
        for slot, choice in enumerate(owners[: len(out.tokens)]):
            if choice is not None and not choice.finished and out.valid[slot] and self._owner[slot] is choice:
                self._process_token(choice, out, slot)

    def _process_token(self, choice: _Choice, out, row: int) -> None:
        token = int(out.tokens[row])
        lp = float(out.logprobs[row])
        choice.count += 1
        choice.logprob_sum += lp
        eos = (not choice.group.req.ignore_eos) and token == self.core.eos_id
        done = bool(out.done[row])
        text = "" if eos else choice.text.add(token)
        info = [] if eos else [TokenInfo(token, lp, list(zip(out.top_ids[row].tolist(), out.top_logprobs[row].tolist())))]
        if choice.text.stopped:
            self._deliver(choice, Delta(choice.index, text, info))
            self._finish(choice, "stop", release=True)
        elif done:
            self._deliver(choice, Delta(choice.index, text + choice.text.finish(), info))
            self._finish(choice, "stop" if eos else "length", release=False)
        elif text or info:
            self._deliver(choice, Delta(choice.index, text, info))

    def _deliver(self, choice: _Choice, delta: Delta) -> None:
        (choice.buffer.append if choice.group.buffered else choice.group.emit)(delta)

    def _finish(self, choice: _Choice, reason: str | None, release: bool, silent: bool = False) -> None:
        if choice.finished:
            return
        choice.finished = True
        if choice.slot is not None and self._owner[choice.slot] is choice:
            if release:
                self.core.release(choice.slot)
            self._owner[choice.slot] = None
        if not silent:
            self._deliver(choice, Delta(choice.index, "", [], reason))
        group = choice.group
        if all(c.finished for c in group.choices) and not group.done:
            self._end_group(group)

    def _end_group(self, group: _Group, silent: bool = False) -> None:
        if group.done:
            return
        group.done = True
        self._groups.pop(group.req.request_id, None)
        if silent:
            group.emit(_END)
            return
        chosen = group.choices
        if group.buffered:  # best_of: the n candidates with the highest mean token logprob
            chosen = sorted(chosen, key=lambda c: -c.logprob_sum / max(c.count, 1))[: group.req.n]
            for new_index, choice in enumerate(chosen):
                for delta in choice.buffer:
                    group.emit(dataclasses.replace(delta, index=new_index))
        group.emit(Usage(len(group.req.prompt_ids), sum(c.count for c in chosen)))
        group.emit(_END)
