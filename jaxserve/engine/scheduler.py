"""The scheduler: continuous batching over the slots and KV pages of a `Core`, from one thread, its only
caller.

(JetStream calls this the orchestrator, vLLM the engine core's scheduler; the device side is `core`.)
Each loop: take new requests, run one prefill call (several short prompts packed, or the next chunk of
one prompt), then a decode step of every decoding slot in its two halves around the host's work:

    dispatch forward(k)   the model, from the tokens of step k-1 already on the device
    fetch step k-1        wait for its tokens; each constrained choice's matcher takes its token
    set_masks, sample(k)  the constrained slots' next masks, then step k's tokens under them
    host work on k-1      detokenize, stop strings, deltas, while the device runs step k

So the device never waits for the host's text work, and a grammar-constrained slot still advances every
step: its next mask (which depends on the token just fetched) is computed while the device runs the
model's forward pass, and only has to be ready before the sampling half. Two exceptions to the overlap,
both for latency: a prefill's first tokens are fetched and delivered before the step is dispatched (the
device waits that long once per admission), and no step is dispatched for a slot whose last token (by
max_tokens) is already in flight, so an idle engine takes the next request at once. The slot table `_owner` maps each
slot to the choice holding it; a request's own state lives in `lifecycle`.
Requests and aborts arrive through thread-safe queues; results leave through each request's `emit`.

Pages (`pages.PagePool`): a request is admitted when its prompt's pages are available; its prefill
shares the longest run of cached full pages of the same tokens and computes the rest; the choices of
n / best_of share the prompt's pages, each with its own copy of the partial last one. Before each step
every decoding sequence gets the page its step writes into; when none is left, the most recently
admitted request is preempted: its pages are freed and it waits first in line, to be recomputed (prompt
and generated tokens) and go on exactly where it stopped.

Admission (`_pick`): among the waiting requests that fit in the free slots, the one that will hold the
fewest slot-steps (slots x max_tokens) goes first, ties in arrival order; so a short request is not kept
waiting behind large n/best_of requests for whole slot-sets to drain. A request overtaken `max_overtakes`
times becomes a barrier: nothing is admitted past it until it fits, so large requests are delayed by a
bounded number of admissions, never starved. A request past its `deadline` is aborted, waiting or running.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxserve.engine.adapters import AdapterEntry, AdapterTable
from jaxserve.engine.contract import Core, PrefillRow
from jaxserve.engine.grammar import Matcher
from jaxserve.engine.lifecycle import END, Choice, Fill, Group, Status
from jaxserve.engine.pages import PagePool
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
    def __init__(
        self,
        core: Core,
        tokenizer: Tokenizer,
        max_waiting: int = 256,
        max_overtakes: int = 8,
        prefix_caching: bool = True,
    ):
        self.core, self.tokenizer = core, tokenizer
        self.max_waiting = max_waiting
        self.max_overtakes = max_overtakes
        self.max_context = core.cache_len
        self._lock = threading.Lock()  # submit vs. closing: nothing is queued after the engine stops
        self._closed = False
        self._inbox: queue.Queue = queue.Queue()
        self._aborts: queue.Queue = queue.Queue()
        self._waiting: collections.deque[Group] = collections.deque()
        self._fills: collections.deque[Fill] = collections.deque()  # prefills to do, in order
        self.pool = PagePool(core.pages, core.page_size, prefix_caching)
        self._table = np.full((core.slots, core.pages_per_seq), core.pages, np.int32)  # each slot's pages
        self._admissions = itertools.count(1)
        self.preemptions = 0
        self._groups: dict[str, Group] = {}  # admitted, not ended
        self._owner: list[Choice | None] = [None] * core.slots
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.healthy = False
        self.steps = 0
        self.error: BaseException | None = None
        self.adapters = AdapterTable(core.max_loras)

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
        which = "best_of" if req.best_of and req.best_of > req.n else "n"
        if req.candidates > self.core.slots:
            raise RequestError(f"n and best_of can be at most {self.core.slots} (the engine's slots)", which)
        # alone in the pool, a request must fit whole (so preempting the others always lets it finish)
        pages = req.candidates * self.pool.pages_for(total)
        if pages > self.pool.pages:
            held = self.pool.pages * self.pool.page_size
            raise ContextLengthError(
                f"the KV cache holds {held} tokens; {req.candidates} sequence(s) of {total} tokens need "
                f"{pages * self.pool.page_size} in pages of {self.pool.page_size}",
                which if req.candidates > 1 else "prompt",
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
            try:  # under the lock: an adapter is never unloaded between its request's check and its queueing
                for group in groups:
                    if group.req.adapter is not None:
                        self._hold_adapter(group, self.adapters.acquire(group.req.adapter))
            except RequestError:
                for group in groups:
                    if group.adapter is not None:
                        self.adapters.release(group.adapter)
                raise
            for group in groups:
                self._inbox.put(group)

    def _hold_adapter(self, group: Group, entry: AdapterEntry) -> None:
        """The group computes with `entry`, which it holds until it emits its last item (END)."""
        group.adapter, emit = entry, group.emit

        def emit_and_release(item):
            if item is END:
                self.adapters.release(entry)
            emit(item)

        group.emit = emit_and_release

    def load_adapter(self, name: str, path: str) -> AdapterEntry:
        """Read the LoRA adapter in directory `path` and serve it as `name` (any thread; the files are read
        here). RequestError naming what is wrong; AdapterTableFull when --max-loras are loaded."""
        if self.core.max_loras == 0:
            raise RequestError("this server serves no LoRA adapters (--max-loras 0)", "lora_name")
        index = self.adapters.reserve(name)
        try:
            self.core.load_adapter(index, self.core.read_adapter(name, path))
        except BaseException:
            self.adapters.free(index)
            raise
        log.info("LoRA adapter %s loaded from %s as adapter %d", name, path, index)
        return self.adapters.publish(name, path, index)

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter `name` (AdapterBusy while requests use it). Its cached pages are never hit
        again (their keys hang off its uid) and age out of the cache."""
        self.adapters.remove(name)
        log.info("LoRA adapter %s unloaded", name)

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """(names of the adapters of admitted requests, of waiting ones), for the metrics (any thread)."""
        names = lambda groups: sorted({g.adapter.name for g in groups if g.adapter is not None})
        return names(list(self._groups.values())), names(list(self._waiting) + list(self._inbox.queue))

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
                idle = pending is None and not self._fills and not self._waiting
                self._intake(block=idle and self.active_slots == 0)
                self._handle_aborts()
                self._expire(time.monotonic())
                # a new sequence's first token goes out before the next step is dispatched: the host's text
                # work and the HTTP write would otherwise share the cores with that step (time to first token)
                first = self._fetch(None, self._prefill())
                for choice, out, row in first:
                    self._process_token(choice, out, row)
                first = [r for r in first if r[0].status is Status.DECODING]
                decoding = [c for c in self._owner if c is not None and self._owes_step(c)]
                self._grow(decoding)
                decoding = [c for c in decoding if c.status is Status.DECODING]  # some may have been preempted
                logits = None  # the device starts the step from tokens it has, before the host has seen them
                if decoding:
                    logits = self.core.forward(
                        self._table, max(c.position for c in decoding), max(c.slot for c in decoding)
                    )
                rows = self._fetch(pending, [])
                pending = None
                if logits is not None:
                    self._write_masks(rows + first)
                    out = self.core.sample(logits)
                    for c in decoding:
                        c.position += 1
                    pending = (out, [None if c is None else (c, c.lease) for c in self._owner])
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

    @staticmethod
    def _owes_step(choice: Choice) -> bool:
        """The choice decodes and its slot's token budget on the device is not spent: the device has sampled
        one token at the insert (or had them all before a resume) and one per step since, so a step
        dispatched for a choice whose last token is still in flight would compute nothing but delay the next
        request. (A slot that ended with EOS is only known once its token is fetched.)"""
        req = choice.group.req
        return choice.status is Status.DECODING and choice.position < len(req.prompt_ids) + req.max_tokens - 1

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
        """Abort an admitted request: its slots and pages are released and freed at once."""
        self._unadmit(group)
        group.abort(error)

    def _unadmit(self, group: Group) -> None:
        """Take an admitted group off the device: its fills dropped, its slots stopped, slots and pages freed."""
        del self._groups[group.req.request_id]
        for fill in [f for f in self._fills if f.group is group]:
            self._fills.remove(fill)
        for choice in group.choices:
            if choice.status is Status.DECODING:
                self.core.release(choice.slot)
            self._free(choice)

    # ---- admission and prefill ----------------------------------------------------------------------

    def _free_slots(self) -> list[int]:
        return [i for i, o in enumerate(self._owner) if o is None]

    def _fits(self, group: Group, free: int) -> bool:
        return group.slots_needed <= free and self._pages_needed(group) <= self.pool.available

    def _pages_needed(self, group: Group) -> int:
        """Pages the group's prefill takes at most (no cache hits counted): its prompt's, and a copy of the
        partial last page for each further choice; or, resumed, every unfinished choice's tokens."""
        pages_for, prompt = self.pool.pages_for, group.req.prompt_ids
        if self._fresh(group):
            return pages_for(len(prompt)) + (len(prompt) % self.pool.page_size > 0) * (group.slots_needed - 1)
        return sum(pages_for(len(prompt) + max(len(c.generated) - 1, 0)) for c in group.unfinished)

    @staticmethod
    def _fresh(group: Group) -> bool:
        """No choice has generated anything yet: one prefill of the prompt, shared by every choice."""
        return not any(c.generated for c in group.choices)

    def _pick(self, free: int) -> Group | None:
        """The next waiting request to admit into `free` slots and the free pages (see the module's
        docstring), or None."""
        barrier = next((g for g in self._waiting if g.overtaken >= self.max_overtakes), None)
        if barrier is not None:
            return barrier if self._fits(barrier, free) else None
        fitting = [g for g in self._waiting if self._fits(g, free)]
        return min(fitting, key=lambda g: g.cost) if fitting else None  # min keeps the first of equal costs

    def _take(self, group: Group) -> Group:
        """Remove `group` from the waiting queue, counting an overtake for each request that came before it."""
        for earlier in self._waiting:
            if earlier is group:
                break
            earlier.overtaken += 1
        self._waiting.remove(group)
        if group.admitted is None:
            group.admitted = time.monotonic()
        return group

    def _admit(self, group: Group) -> list[Fill]:
        """Give the group its slots and its fills' pages (cached ones held, the rest allocated); returns
        its fills, queued."""
        self._groups[group.req.request_id] = group
        group.status = Status.PREFILLING
        group.admission = next(self._admissions)
        free = self._free_slots()
        choices = group.unfinished if group.req.max_tokens > 0 else group.choices[:1]
        for choice, slot in zip(choices, free):
            choice.slot = slot
            self._owner[slot] = choice  # reserved; no step output reaches it before its insert
        prompt = list(group.req.prompt_ids)
        if self._fresh(group):
            fills = [self._fill(group, choices[0], prompt, score=group.req.echo and not group.echoed)]
        else:
            fills = [self._fill(group, c, prompt + c.generated[:-1], score=False) for c in choices]
        self._fills.extend(fills)
        return fills

    def _fill(self, group: Group, choice: Choice, tokens: list[int], score: bool) -> Fill:
        """Start filling `choice`'s pages with `tokens`: the longest cached run of full pages is shared
        (with `score`, only pages that kept their echo rows); computing starts after it, or one position
        earlier where that position's logits are needed (the last token, or echo's row predicting the first
        uncached token), without rewriting the shared page."""
        hits = self.pool.lookup(tokens, rows=score, root=group.cache_root)
        self.pool.count_query(len(tokens), len(hits) * self.pool.page_size)
        for entry in hits:
            self.pool.hold(entry.page)
        cached = len(hits) * self.pool.page_size
        pages = [e.page for e in hits]
        for _ in range(self.pool.pages_for(len(tokens)) - len(hits)):
            page = self.pool.allocate()
            assert page is not None, "admission counted the pages"
            pages.append(page)
        self._set_pages(choice, pages)
        start = cached - (cached > 0 and (score or cached == len(tokens)))
        rows = [row for e in hits for row in e.rows] if score else []
        return Fill(group, choice, tokens, start, cached, list(hits), rows, score)

    def _set_pages(self, choice: Choice, pages: list[int]) -> None:
        choice.pages = pages
        self._table[choice.slot] = self.core.pages
        self._table[choice.slot, : len(pages)] = pages

    def _admit_waiting(self) -> None:
        """Admit the next waiting request; then more, while every fill so far is a whole short prompt
        that no cached page holds and one packed prefill shape takes them all."""
        free = len(self._free_slots())
        while (group := self._pick(free)) is not None:
            fills = self._fills
            n = len(group.req.prompt_ids)
            if fills:
                if not (self._fresh(group) and all(f.start == 0 for f in fills)):
                    return
                if self.core.packing(len(fills) + 1, max(n, *(len(f.tokens) for f in fills))) is None:
                    return
            self._admit(self._take(group))
            free -= group.slots_needed
            if len(self._fills) > 1 and self._fills[-1].start > 0:  # a cache hit: prefilled alone, later
                return

    def _prefill(self) -> list:
        """One prefill call per loop: several short prompts packed together, or the next chunk of one
        sequence (so a long prompt delays running streams by at most one chunk per step). Returns the
        (choice, first-token output) pairs inserted."""
        if not self._fills and self._waiting:
            self._admit_waiting()
        if not self._fills:
            return []
        packed = list(itertools.takewhile(lambda f: f.start == 0, self._fills))
        if len(packed) > 1 and self.core.packing(len(packed), max(len(f.tokens) for f in packed)) is not None:
            rows = [
                PrefillRow(f.choice.slot, f.tokens, 0, f.targets(0, len(f.tokens)), 0, f.group.adapter_index)
                for f in packed
            ]
            out = self.core.prefill(rows, self._table, score=any(f.score for f in packed))
            inserted = []
            for i, fill in enumerate(packed):
                self._fills.popleft()
                fill.filled(out, i, len(fill.tokens), self.pool)
                inserted += self._filled(fill, out, i)
            return inserted
        fill = self._fills[0]
        chunk = fill.tokens[fill.start : fill.start + self.core.chunk]
        targets = fill.targets(fill.start, len(chunk))
        row = PrefillRow(fill.choice.slot, chunk, fill.start, targets, fill.cached, fill.group.adapter_index)
        out = self.core.prefill([row], self._table, score=fill.score)
        fill.filled(out, 0, len(chunk), self.pool)
        if fill.start < len(fill.tokens):
            return []
        self._fills.popleft()
        return self._filled(fill, out, 0)

    def _filled(self, fill: Fill, out, row: int) -> list:
        """`fill`'s tokens are all in its pages: echo the prompt, then start decoding (the group's choices
        sharing the prompt's pages, each with a copy of the partial last one) or resume."""
        group, choice = fill.group, fill.choice
        if fill.score:
            self._echo(fill)
        if group.req.max_tokens == 0:
            for c in group.choices:
                self._finish(c, "length")
            return []
        if choice.generated:
            self._resume(choice)
            return []
        n_prompt = len(group.req.prompt_ids)
        choices = group.unfinished if self._fresh(group) and choice is group.unfinished[0] else [choice]
        full = choice.pages[: n_prompt // self.pool.page_size]
        inserted = []
        for c in choices:
            if c is not choice:
                for page in full:
                    self.pool.hold(page)
                own = []
                if n_prompt % self.pool.page_size:
                    page = self.pool.allocate()
                    assert page is not None, "admission counted the copies"
                    self.core.copy_page(choice.pages[len(full)], page)
                    own = [page]
                self._set_pages(c, full + own)
            inserted.append((c, self._insert(c, out.last_logits[row], n_prompt)))
        if all(c.status is Status.DECODING for c in group.unfinished):
            group.status = Status.DECODING
        return inserted

    def _insert(self, choice: Choice, logits, n_prompt: int):
        req, mask = choice.group.req, None
        if req.grammar is not None:
            choice.matcher = Matcher(self.tokenizer, req.grammar, self.core.vocab_size)
            mask = choice.matcher.mask()
        out = self.core.insert(
            choice.slot,
            logits,
            choice.params,
            n_prompt,
            req.max_tokens,
            not req.ignore_eos,
            mask,
            choice.group.adapter_index,
        )
        choice.position, choice.status = n_prompt, Status.DECODING
        return out

    def _resume(self, choice: Choice) -> None:
        """Decode on from the last generated token; the pages hold everything before it."""
        req, generated = choice.group.req, choice.generated
        position = len(req.prompt_ids) + len(generated) - 1
        mask = None if choice.matcher is None else choice.matcher.mask()
        self.core.resume(
            choice.slot,
            generated[-1],
            choice.params,
            position,
            generated,
            req.max_tokens - len(generated),
            not req.ignore_eos,
            mask,
            choice.group.adapter_index,
        )
        choice.position, choice.status = position, Status.DECODING
        if all(c.status is Status.DECODING for c in choice.group.unfinished):
            choice.group.status = Status.DECODING

    def _echo(self, fill: Fill) -> None:
        """Send the prompt with its logprobs: rows of cached pages, then of the chunks computed (fetched
        now); pages filled here keep theirs for later hits."""
        rows = list(fill.rows)
        for out, row, length in fill.scored:
            out = self.core.fetch(out)
            rows += [
                (
                    float(out.logprobs[row, t]),
                    list(zip(out.top_ids[row, t].tolist(), out.top_logprobs[row, t].tolist())),
                )
                for t in range(length)
            ]
        S = self.pool.page_size
        for i, entry in enumerate(fill.chain):
            if entry.rows is None:
                entry.rows = rows[max(i * S - 1, 0) : (i + 1) * S - 1]
        fill.group.echo(rows)

    def _fetch(self, pending, inserted: list) -> list[tuple[Choice, object, int]]:
        """The real tokens of the last step and of this loop's inserts, as (choice, host output, row), for the
        choices that still hold their slot (owners at dispatch are (choice, lease)) and were not preempted;
        each constrained choice's matcher takes its token at once, so its next mask can be written."""
        rows = []
        if pending is not None:
            out, owners = pending
            out = self.core.fetch(out)
            for slot, owner in enumerate(owners[: len(out.tokens)]):
                if owner is None:
                    continue
                choice, lease = owner
                if choice.status is Status.DECODING and out.valid[slot] and (self._owner[slot], choice.lease) == owner:
                    rows.append((choice, out, slot))
        rows += [(choice, self.core.fetch(out), 0) for choice, out in inserted if choice.status is Status.DECODING]
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

    # ---- pages while decoding -----------------------------------------------------------------------

    def _grow(self, decoding: list[Choice]) -> None:
        """Give every decoding choice the page its next step writes into, preempting the most recently
        admitted request while none is available."""
        for choice in decoding:
            column = choice.position // self.pool.page_size
            while choice.status is Status.DECODING and len(choice.pages) <= column < self.core.pages_per_seq:
                page = self.pool.allocate()
                if page is None:
                    self._preempt(max(self._groups.values(), key=lambda g: g.admission))
                    continue
                self._table[choice.slot, len(choice.pages)] = page
                choice.pages.append(page)

    def _preempt(self, group: Group) -> None:
        """Free the group's slots and pages and queue it first, to be recomputed when pages allow."""
        log.info("preempting %s (%d pages in use)", group.req.request_id, self.pool.held)
        self.preemptions += 1
        group.preemptions += 1
        self._unadmit(group)
        for choice in group.unfinished:
            choice.status = Status.WAITING
        group.status = Status.WAITING
        group.overtaken = self.max_overtakes  # nothing is admitted past it
        self._waiting.appendleft(group)

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
        """Give back the choice's slot and pages (ending its lease: a step in flight is not its own now)."""
        choice.lease += 1
        if choice.slot is not None and self._owner[choice.slot] is choice:
            self._owner[choice.slot] = None
            self._table[choice.slot] = self.core.pages
        for page in choice.pages:
            self.pool.drop(page)
        choice.pages, choice.slot = [], None

    def _finish(self, choice: Choice, reason: str) -> None:
        choice.matcher = None
        self._free(choice)
        choice.group.finish(choice, reason)
        if choice.group.ended:
            self._groups.pop(choice.group.req.request_id, None)
