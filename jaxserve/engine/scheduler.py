"""The scheduler: continuous batching over the slots of a `Core`, from one thread, its only caller.

(JetStream calls this the orchestrator, vLLM the engine core's scheduler; the device side is `core`.)
Each loop: take new requests, run one prefill call (several short prompts packed, or the next chunk of
one prompt), then a decode step of every decoding slot in its two halves around the host's work:

    dispatch forward(k)   the model, from the tokens of step k-1 already on the device
    fetch step k-1        wait for its tokens; each constrained choice's matcher takes its token
    set_masks, sample(k)  the constrained slots' next masks, then step k's tokens under them
    host work on k-1      detokenize, stop strings, deltas, while the device runs step k

So the device never waits for the host's text work, and a grammar-constrained slot still advances every
step: its next mask (which depends on the token just fetched) is computed while the device runs the
model's forward pass, and only has to be ready before the sampling half. The slot table `_owner` maps each
slot to the choice holding it; a request's own state lives in `lifecycle`.
Requests and aborts arrive through thread-safe queues; results leave through each request's `emit`.

Admission (`_pick`): among the waiting requests that fit in the free slots, the one that will hold the
fewest slot-steps (slots x max_tokens) goes first, ties in arrival order; so a short request is not kept
waiting behind large n/best_of requests for whole slot-sets to drain. A request overtaken `max_overtakes`
times becomes a barrier: nothing is admitted past it until it fits, so large requests are delayed by a
bounded number of admissions, never starved. A request past its `deadline` is aborted, waiting or running.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from jaxserve.engine.contract import Core, PrefillRow
from jaxserve.engine.grammar import Matcher
from jaxserve.engine.lifecycle import Choice, Group, Status
from jaxserve.engine.types import (
    ContextLengthError,
    DeadlineExceeded,
    EngineRequest,
    EngineStopped,
    QueueFull,
    RequestError,
)
from jaxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, core: Core, tokenizer: Tokenizer, max_waiting: int = 256, max_overtakes: int = 8):
        self.core, self.tokenizer = core, tokenizer
        self.max_waiting = max_waiting
        self.max_overtakes = max_overtakes
        self.max_context = core.cache_len
        self._lock = threading.Lock()  # submit vs. closing: nothing is queued after the engine stops
        self._closed = False
        self._inbox: queue.Queue = queue.Queue()
        self._aborts: queue.Queue = queue.Queue()
        self._waiting: collections.deque[Group] = collections.deque()
        self._prefilling: Group | None = None
        self._groups: dict[str, Group] = {}  # admitted, not ended
        self._owner: list[Choice | None] = [None] * core.slots
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.healthy = False
        self.steps = 0
        self.error: BaseException | None = None

    # ---- any thread ---------------------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="jaxserve-scheduler", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread:
            self._thread.join(timeout)

    def validate(self, req: EngineRequest) -> None:
        """Raise RequestError (naming the parameter) for a request this engine can never run."""
        if not req.prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        total = len(req.prompt_ids) + req.max_tokens
        if total > self.max_context:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{total} tokens ({len(req.prompt_ids)} in the prompt, {req.max_tokens} for the completion).",
                "prompt",
            )
        if req.candidates > self.core.slots:
            raise RequestError(
                f"n and best_of can be at most {self.core.slots} (the engine's slots)",
                "best_of" if req.best_of and req.best_of > req.n else "n",
            )

    def submit(self, reqs: Sequence[EngineRequest], emit: Callable[[int, object], None]) -> None:
        """Queue requests, all or none: each item of request i is passed to emit(i, item) (see
        `lifecycle`). Raises RequestError, QueueFull or EngineStopped before queueing anything."""
        if len(reqs) > self.max_waiting:  # could never be queued: a client error, not a reason to retry
            raise RequestError(
                f"a request may hold at most {self.max_waiting} prompts (the server's waiting bound), got {len(reqs)}",
                "prompt",
            )
        for req in reqs:
            self.validate(req)
        groups = [Group(req, lambda item, i=i: emit(i, item), self.tokenizer) for i, req in enumerate(reqs)]
        with self._lock:
            if self._closed:
                raise EngineStopped("the engine is not running" + (f": {self.error}" if self.error else ""))
            if self.queue_depth + len(groups) > self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            for group in groups:
                self._inbox.put(group)

    def abort(self, request_id: str) -> None:
        self._aborts.put(request_id)

    @property
    def active_slots(self) -> int:
        return sum(o is not None for o in self._owner)

    @property
    def queue_depth(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    # ---- the scheduler thread -----------------------------------------------------------------------

    def _run(self) -> None:
        pending = None  # (output, owners at dispatch) of the last step, its tokens not yet seen by the host
        self.healthy = True
        try:
            while not self._stop.is_set():
                idle = pending is None and self._prefilling is None and not self._waiting
                self._intake(block=idle and self.active_slots == 0)
                self._handle_aborts()
                self._expire(time.monotonic())
                inserted = self._prefill()
                decoding = [c for c in self._owner if c is not None and c.status is Status.DECODING]
                logits = None  # the device starts the step from tokens it has, before the host has seen them
                if decoding:
                    logits = self.core.forward(max(c.position for c in decoding), max(c.slot for c in decoding))
                rows = self._fetch(pending, inserted)
                pending = None
                if logits is not None:
                    self._write_masks(rows)
                    out = self.core.sample(logits)
                    for c in decoding:
                        c.position += 1
                    pending = (out, list(self._owner))
                for choice, out, row in rows:  # while the device runs the step
                    self._process_token(choice, out, row)
                self.steps += 1
            self._close(EngineStopped("the server is shutting down"))
        except BaseException as e:  # an engine failure ends every open stream, never silently
            log.exception("engine failure")
            self.error = e
            self._close(e)
        finally:
            self.healthy = False

    def _close(self, error: BaseException) -> None:
        with self._lock:
            self._closed = True
        self._intake(block=False)
        for group in list(self._groups.values()) + list(self._waiting):
            group.abort(error)
        self._groups.clear()
        self._waiting.clear()

    def _intake(self, block: bool) -> None:
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if item is not None:  # None: a wake-up from shutdown
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
            for group in [g for g in self._waiting if g.req.request_id == request_id]:
                self._waiting.remove(group)
                group.abort()
            group = self._groups.get(request_id)
            if group is not None:
                self._end_admitted(group)

    def _expire(self, now: float) -> None:
        """Abort every request past its deadline, telling its caller whether it was still waiting."""
        for group in [g for g in self._waiting if g.req.deadline is not None and now > g.req.deadline]:
            self._waiting.remove(group)
            group.abort(DeadlineExceeded("the request's deadline passed while it waited for a slot", queued=True))
        for group in [g for g in self._groups.values() if g.req.deadline is not None and now > g.req.deadline]:
            made = sum(c.count for c in group.choices)
            self._end_admitted(
                group, DeadlineExceeded(f"the request's deadline passed after {made} generated tokens", queued=False)
            )

    def _end_admitted(self, group: Group, error: BaseException | None = None) -> None:
        """Abort an admitted request: its slots are released and freed at once."""
        del self._groups[group.req.request_id]
        if self._prefilling is group:
            self._prefilling = None
        for choice in group.choices:
            if choice.status is Status.DECODING:
                self.core.release(choice.slot)
            self._free(choice)
        group.abort(error)

    # ---- admission and prefill ----------------------------------------------------------------------

    def _free_slots(self) -> list[int]:
        return [i for i, o in enumerate(self._owner) if o is None]

    def _admit(self, group: Group) -> bool:
        """Reserve the group's slots if enough are free."""
        free = self._free_slots()
        if len(free) < group.slots_needed:
            return False
        self._groups[group.req.request_id] = group
        group.status = Status.PREFILLING
        for choice, slot in zip(group.choices, free):
            choice.slot = slot
            self._owner[slot] = choice  # reserved; no step output reaches it before its insert
        return True

    def _pick(self, free: int) -> Group | None:
        """The next waiting request to admit into `free` slots (see the module's docstring), or None."""
        barrier = next((g for g in self._waiting if g.overtaken >= self.max_overtakes), None)
        if barrier is not None:
            return barrier if barrier.slots_needed <= free else None
        fitting = [g for g in self._waiting if g.slots_needed <= free]
        return min(fitting, key=lambda g: g.cost) if fitting else None  # min keeps the first of equal costs

    def _take(self, group: Group) -> Group:
        """Remove `group` from the waiting queue, counting an overtake for each request that came before it."""
        for earlier in self._waiting:
            if earlier is group:
                break
            earlier.overtaken += 1
        self._waiting.remove(group)
        group.admitted = time.monotonic()
        return group

    def _admit_packed(self) -> list[Group]:
        """Admit waiting short prompts in `_pick` order, as many as one packed prefill shape holds."""
        admitted, longest = [], 0
        free = len(self._free_slots())
        while (group := self._pick(free)) is not None:
            n = len(group.req.prompt_ids)
            if self.core.packing(len(admitted) + 1, max(longest, n)) is None:
                break
            self._admit(self._take(group))
            admitted.append(group)
            longest, free = max(longest, n), free - group.slots_needed
        return admitted

    def _prefill(self) -> list:
        """One prefill call per loop: several short prompts packed together, or the next chunk of one
        prompt (so a long prompt delays running streams by at most one chunk per step). Returns the
        (choice, first-token output) pairs inserted."""
        if self._prefilling is None and self._waiting:
            packed = self._admit_packed()
            if len(packed) > 1:
                rows = [
                    PrefillRow(g.choices[0].slot, list(g.req.prompt_ids), 0, g.targets(0, len(g.req.prompt_ids)))
                    for g in packed
                ]
                out = self.core.prefill(rows, score=any(g.req.echo for g in packed))
                return [pair for i, g in enumerate(packed) for pair in self._prefilled(g, out, i)]
            if packed:
                self._prefilling = packed[0]
            elif (group := self._pick(len(self._free_slots()))) is not None:
                self._admit(self._take(group))
                self._prefilling = group
        group = self._prefilling
        if group is None:
            return []
        prompt, start = group.req.prompt_ids, group.prefilled
        chunk = list(prompt[start : start + self.core.chunk])
        out = self.core.prefill(
            [PrefillRow(group.choices[0].slot, chunk, start, group.targets(start, len(chunk)))], score=group.req.echo
        )
        group.prefilled += len(chunk)
        if group.req.echo:
            group.scored.append((out, 0, len(chunk)))
        if group.prefilled < len(prompt):
            return []
        self._prefilling = None
        return self._prefilled(group, out, 0)

    def _prefilled(self, group: Group, out, row: int) -> list:
        """The whole prompt is in the cache: echo it, then fork it to every choice's slot and insert."""
        if group.req.echo:
            self._echo(group, group.scored or [(out, row, len(group.req.prompt_ids))])
        if group.req.max_tokens == 0:
            for choice in group.choices:
                self._finish(choice, "length")
            return []
        n_prompt = len(group.req.prompt_ids)
        src = group.choices[0].slot
        inserted = []
        for choice in group.choices:
            if choice.slot != src:
                self.core.fork(src, choice.slot, n_prompt)
            mask = None
            if group.req.grammar is not None:
                choice.matcher = Matcher(self.tokenizer, group.req.grammar, self.core.vocab_size)
                mask = choice.matcher.mask()
            step_out = self.core.insert(
                choice.slot,
                out.last_logits[row],
                choice.params,
                n_prompt,
                group.req.max_tokens,
                not group.req.ignore_eos,
                mask,
            )
            choice.position, choice.status = n_prompt, Status.DECODING
            inserted.append((choice, step_out))
        group.status = Status.DECODING
        return inserted

    def _echo(self, group: Group, scored: list) -> None:
        rows = []  # row j: log p(prompt[j + 1] | prompt[:j + 1]) and the top tokens there
        for out, row, length in scored:
            out = self.core.fetch(out)
            rows += [
                (
                    float(out.logprobs[row, t]),
                    list(zip(out.top_ids[row, t].tolist(), out.top_logprobs[row, t].tolist())),
                )
                for t in range(length)
            ]
        group.scored = []
        group.echo(rows)

    def _fetch(self, pending, inserted: list) -> list[tuple[Choice, object, int]]:
        """The real tokens of the last step and of this loop's inserts, as (choice, host output, row); each
        constrained choice's matcher takes its token at once, so its next mask can be written."""
        rows = []
        if pending is not None:
            out, owners = pending
            out = self.core.fetch(out)
            rows = [
                (choice, out, slot)
                for slot, choice in enumerate(owners[: len(out.tokens)])
                if choice is not None
                and choice.status is Status.DECODING
                and out.valid[slot]
                and self._owner[slot] is choice
            ]
        rows += [(choice, self.core.fetch(out), 0) for choice, out in inserted]
        for choice, out, row in rows:
            if choice.matcher is not None:
                choice.matcher.consume(int(out.tokens[row]))
        return rows

    def _write_masks(self, rows: list) -> None:
        """The next token's mask of each constrained choice that has just taken a token and goes on (a slot's
        mask stays until replaced)."""
        constrained = [c for c, out, row in rows if c.matcher is not None and not out.done[row]]
        if constrained:
            self.core.set_masks([c.slot for c in constrained], [c.matcher.mask() for c in constrained])

    # ---- decode results -----------------------------------------------------------------------------

    def _process_token(self, choice: Choice, out, row: int) -> None:
        """Detokenize, match stop strings, deliver; finish the choice if its sequence ended."""
        top = list(zip(out.top_ids[row].tolist(), out.top_logprobs[row].tolist()))
        delta, eos = choice.take_token(int(out.tokens[row]), float(out.logprobs[row]), top, self.core.eos_ids)
        if choice.text.stopped:  # a stop string: the device would go on, so stop the slot there
            choice.deliver(delta)
            self.core.release(choice.slot)
            self._finish(choice, "stop")
        elif out.done[row]:  # EOS or max_tokens: the device has already stopped the slot
            delta.text += choice.text.finish()
            choice.deliver(delta)
            self._finish(choice, "stop" if eos else "length")
        elif delta.text or delta.tokens:
            choice.deliver(delta)

    def _free(self, choice: Choice) -> None:
        choice.matcher = None
        if choice.slot is not None and self._owner[choice.slot] is choice:
            self._owner[choice.slot] = None

    def _finish(self, choice: Choice, reason: str) -> None:
        self._free(choice)
        choice.group.finish(choice, reason)
        if choice.group.ended:
            self._groups.pop(choice.group.req.request_id, None)
