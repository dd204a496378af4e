"""The scheduler: continuous batching over the slots and KV pages of a `Runner`, from one thread, its only
caller. It decides; the runner executes. What passes between them is a plan (`plan.StepPlan`, then
`plan.SamplePlan`): plain data, so the same plans can run in this process or in every process of a group.

Each loop reads as its phases (JetStream's orchestrator, vLLM's engine core step):

    intake, aborts, deadlines
    prefill phase   admit; plan one prefill (several short prompts packed, or the next chunk of one prompt)
                    with the starts of the sequences it completes; execute; deliver their first tokens
    decode phase    plan: a page for each decoding slot's next position (preempting when none is left),
                    then the model's half of step k, from the tokens of step k-1 already on the device;
                    execute; fetch step k-1 (each constrained choice's matcher takes its token); plan the
                    masks and execute the sampling half of step k; host work on k-1 (detokenize, stop
                    strings, deltas) while the device runs step k

So the device never waits for the host's text work, and a constrained slot's next mask is computed while the
device runs the forward pass. Two exceptions, for latency: a prefill's first tokens are delivered before the
step is planned, and no step is planned for a slot whose last token is already in flight. `_owner` maps each
slot to its choice; a request's state: `lifecycle`, its adapter: `adapters`. A slot the host stops (stop
string, abort, preemption) is released by the next plan, first. In: `intake`; out: each request's `emit`; next:
`admission`; pages: `kv`. A decoding sequence short of a page preempts the most recently admitted request: its
pages are freed and it waits first in line, to be recomputed and go on exactly where it stopped.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

from jaxserve.engine import admission
from jaxserve.engine.adapters import AdapterTable, adapter_names
from jaxserve.engine.contract import Runner, StepResult
from jaxserve.engine.grammar import Matcher
from jaxserve.engine.intake import Intake
from jaxserve.engine.kv import KVManager
from jaxserve.engine.lifecycle import Choice, Fill, Group, Status
from jaxserve.engine.pages import PagePool
from jaxserve.engine.plan import Decode, PrefillRow, SamplePlan, Start, StepPlan
from jaxserve.engine.types import DeadlineExceeded, EngineRequest, EngineStats, EngineStopped
from jaxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        core: Runner,
        tokenizer: Tokenizer,
        max_waiting: int = 256,
        max_overtakes: int = 8,
        prefix_caching: bool = True,
    ):
        self.core, self.tokenizer = core, tokenizer
        self.max_overtakes = max_overtakes
        self.max_context = core.cache_len
        self.intake = Intake(max_waiting)
        self._waiting = self.intake.waiting
        self._fills: collections.deque[Fill] = collections.deque()  # prefills to do, in order
        self.kv = KVManager(core.slots, core.pages, core.page_size, core.pages_per_seq, prefix_caching)
        self._releases: list[int] = []  # slots the host stopped, for the next plan
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
        self.intake.wake()
        if self._thread:
            self._thread.join(timeout)

    def validate(self, req: EngineRequest) -> None:
        """Raise RequestError (naming the parameter) for a request this engine can never run."""
        admission.validate(req, self.max_context, self.core.slots, self.kv)

    def submit(self, reqs: Sequence[EngineRequest], emit: Callable[[int, object], None]) -> None:
        """Queue requests, all or none: each item of request i is passed to emit(i, item) (see
        `lifecycle`). Raises RequestError, QueueFull or EngineStopped before queueing anything."""
        self.intake.check(len(reqs))
        for req in reqs:
            self.validate(req)
        groups = [Group(req, lambda item, i=i: emit(i, item), self.tokenizer) for i, req in enumerate(reqs)]
        with self.adapters.holding(groups):  # never unloaded between this check and the queueing, nor after
            self.intake.put(groups, self.error)

    def abort(self, request_id: str) -> None:
        self.intake.abort(request_id)

    @property
    def active_slots(self) -> int:
        return sum(o is not None for o in self._owner)

    @property
    def pool(self) -> PagePool:
        """The KV pool, for its counters."""
        return self.kv.pool

    @property
    def queue_depth(self) -> int:
        return self.intake.depth

    def stats(self) -> EngineStats:
        """A snapshot for metrics and probes (read racily from their thread: each count is one that was true)."""
        own = dict(queue_depth=self.queue_depth, active_slots=self.active_slots, steps=self.steps)
        own |= dict(healthy=self.healthy, preemptions=self.preemptions, max_loras=self.core.max_loras)
        names = adapter_names
        own |= dict(running_adapters=names(self._groups.values()), waiting_adapters=names(self._waiting))
        return EngineStats(**own, **self.kv.stats(), **self.core.stats())

    # ---- the scheduler thread -----------------------------------------------------------------------

    def _run(self) -> None:
        pending = None  # (output, owners at dispatch) of the last step, its tokens not yet seen by the host
        self.healthy = True
        try:
            while not self._stop.is_set():
                idle = pending is None and not self._fills and not self._waiting and self.active_slots == 0
                self.intake.drain(block=idle, on_wait=self.core.idle)
                self._handle_aborts()
                self._expire(time.monotonic())
                first = self._prefill_phase()
                pending = self._decode_phase(pending, first)
                self.steps += 1
            self.close(EngineStopped("the server is shutting down"))
        except BaseException as e:  # an engine failure ends every open stream, never silently
            log.exception("engine failure")
            self.close(e, failed=True)
        finally:
            self.healthy = False

    def _plan(self, **parts) -> StepPlan:
        """A StepPlan of `parts` over the page table as it is now, with the releases owed."""
        releases, self._releases = tuple(self._releases), []
        return StepPlan(table=self.kv.table.copy(), releases=releases, **parts)

    def _prefill_phase(self) -> list[tuple[Choice, StepResult, int]]:
        """Admit, prefill, start the sequences whose tokens are all in: the first token of each insert,
        fetched and delivered (those whose choice goes on are returned, for their masks)."""
        first = self._fetch(None, self._prefill())
        for choice, out, row in first:
            self._process_token(choice, out, row)
        return [r for r in first if r[0].status is Status.DECODING]

    def _decode_phase(self, pending, first: list) -> tuple | None:
        """Step k of every decoding slot, around the host's work on step k-1 (`pending`); returns step k's
        output with its owners, or None when nothing decodes."""
        decoding = [c for c in self._owner if c is not None and self._owes_step(c)]
        self._grow(decoding)
        decoding = [c for c in decoding if c.status is Status.DECODING]  # some may have been preempted
        masks = any(c is not None and c.matcher is not None for c in self._owner)  # its SamplePlan may hold some
        step = Decode(max(c.position for c in decoding), max(c.slot for c in decoding), masks) if decoding else None
        plan = self._plan(decode=step)  # the device starts the step from tokens it has, before the host has seen them
        if not plan.empty:
            self.core.execute(plan)
        rows = self._fetch(pending, [])
        out = None
        if step is not None:
            out = self.core.sample_tokens(self._masks(rows + first))
            for c in decoding:
                c.position += 1
        for choice, row_out, row in rows:  # while the device runs the step
            self._process_token(choice, row_out, row)
        return None if out is None else (out, [None if c is None else (c, c.lease) for c in self._owner])

    @staticmethod
    def _owes_step(choice: Choice) -> bool:
        """The choice decodes and its slot's token budget on the device is not spent: the device has sampled
        one token at the insert (or had them all before a resume) and one per step since, so a step
        dispatched for a choice whose last token is still in flight would compute nothing but delay the next
        request. (A slot that ended with EOS is only known once its token is fetched.)"""
        req = choice.group.req
        return choice.status is Status.DECODING and choice.position < len(req.prompt_ids) + req.max_tokens - 1

    def close(self, error: BaseException, failed: bool = False) -> None:
        """End every open request with `error`, accept none from now on (`failed`: it is the engine's); any thread."""
        self.healthy, self.error = False, error if failed else self.error
        for group in list(self._groups.values()) + self.intake.close():
            group.abort(error)
        self._groups.clear()

    def _handle_aborts(self) -> None:
        for request_id in self.intake.aborted():
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
            error = DeadlineExceeded(f"the request's deadline passed after {made} generated tokens", queued=False)
            self._end_admitted(group, error)

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
                self._releases.append(choice.slot)
            self._free(choice)

    # ---- admission and prefill ----------------------------------------------------------------------

    def _free_slots(self) -> list[int]:
        return [i for i, o in enumerate(self._owner) if o is None]

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
        if admission.fresh(group):
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
        hits = self.kv.open(choice.slot, tokens, rows=score, root=group.cache_root)
        cached = len(hits) * self.kv.page_size
        start = cached - (cached > 0 and (score or cached == len(tokens)))
        rows = [row for e in hits for row in e.rows] if score else []
        return Fill(group, choice, tokens, start, cached, list(hits), rows, score)

    def _admit_waiting(self) -> None:
        """Admit the next waiting request; then more, while every fill so far is a whole short prompt
        that no cached page holds and one packed prefill shape takes them all."""
        free = len(self._free_slots())
        while (group := admission.pick(self._waiting, free, self.kv, self.max_overtakes)) is not None:
            fills = self._fills
            n = len(group.req.prompt_ids)
            if fills:
                if not (admission.fresh(group) and all(f.start == 0 for f in fills)):
                    return
                if self.core.packing(len(fills) + 1, max(n, *(len(f.tokens) for f in fills))) is None:
                    return
            self._admit(admission.take(self._waiting, group))
            free -= group.slots_needed
            if len(self._fills) > 1 and self._fills[-1].start > 0:  # a cache hit: prefilled alone, later
                return

    def _prefill(self) -> list[tuple[Choice, StepResult]]:
        """One prefill per loop: several short prompts packed together, or the next chunk of one sequence
        (so a long prompt delays running streams by at most one chunk per step), planned with the starts of
        the sequences it completes and executed. Returns the (choice, first-token output) of each insert."""
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
            fills = packed
        else:
            fill = self._fills[0]
            chunk = fill.tokens[fill.start : fill.start + self.core.chunk]
            targets = fill.targets(fill.start, len(chunk))
            rows = [PrefillRow(fill.choice.slot, chunk, fill.start, targets, fill.cached, fill.group.adapter_index)]
            fills = [fill]
        copies: list[tuple[int, int]] = []
        starts: list[tuple[Choice, Start]] = []
        complete = []
        for i, (fill, row) in enumerate(zip(fills, rows)):
            fill.filled(len(row.tokens), self.kv)
            if fill.start == len(fill.tokens):
                self._fills.remove(fill)
                complete.append(fill)
                starts += self._starts(fill, i, copies)
        plan = self._plan(
            prefill=tuple(rows),
            score=any(f.score for f in fills),
            copies=tuple(copies),
            starts=tuple(s for _, s in starts),
        )
        done = self.core.execute(plan)
        for i, (fill, row) in enumerate(zip(fills, rows)):
            if fill.score:
                fill.scored.append((done.prefill, i, len(row.tokens)))
        for fill in complete:
            if fill.score:
                fill.echo(self.core.fetch, self.kv.page_size)
            if fill.group.req.max_tokens == 0:
                for c in fill.group.choices:
                    self._finish(c, "length")
        return [(c, out) for (c, s), out in zip(starts, done.starts) if s.inserts]

    def _starts(self, fill: Fill, row: int, copies: list) -> list[tuple[Choice, Start]]:
        """`fill`'s tokens are all in its pages (its prefill's row `row`): start decoding (the group's choices
        sharing the prompt's pages, each with a copy of the partial last one, added to `copies`) or resume."""
        group, choice = fill.group, fill.choice
        if group.req.max_tokens == 0:  # scoring only: finished once the echo is out
            return []
        if choice.generated:
            return [(choice, self._resume(choice))]
        n_prompt = len(group.req.prompt_ids)
        choices = group.unfinished if admission.fresh(group) and choice is group.unfinished[0] else [choice]
        starts = []
        for c in choices:
            if c is not choice and (copy := self.kv.share(choice.slot, c.slot, n_prompt)) is not None:
                copies.append(copy)
            starts.append((c, self._insert(c, row, n_prompt)))
        if all(c.status is Status.DECODING for c in group.unfinished):
            group.status = Status.DECODING
        return starts

    def _insert(self, choice: Choice, row: int, n_prompt: int) -> Start:
        req, mask = choice.group.req, None
        if req.grammar is not None:
            choice.matcher = Matcher(self.tokenizer, req.grammar, self.core.vocab_size)
            mask = choice.matcher.mask()
        choice.position, choice.status = n_prompt, Status.DECODING
        stop_on_eos, adapter = not req.ignore_eos, choice.group.adapter_index
        return Start(choice.slot, choice.params, n_prompt, req.max_tokens, stop_on_eos, mask, row, adapter=adapter)

    def _resume(self, choice: Choice) -> Start:
        """Decode on from the last generated token; the pages hold everything before it."""
        req, generated = choice.group.req, choice.generated
        position = len(req.prompt_ids) + len(generated) - 1
        mask = None if choice.matcher is None else choice.matcher.mask()
        choice.position, choice.status = position, Status.DECODING
        if all(c.status is Status.DECODING for c in choice.group.unfinished):
            choice.group.status = Status.DECODING
        left, stop_on_eos = req.max_tokens - len(generated), not req.ignore_eos
        tail = (generated[-1], tuple(generated), choice.group.adapter_index)  # token, generated, adapter
        return Start(choice.slot, choice.params, position, left, stop_on_eos, mask, -1, *tail)

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

    def _masks(self, rows: list) -> SamplePlan:
        """The next token's mask of each constrained choice that has just taken a token and goes on (a slot's
        mask stays until replaced)."""
        constrained = [c for c, out, row in rows if c.matcher is not None and not out.done[row]]
        return SamplePlan(tuple(c.slot for c in constrained), tuple(c.matcher.mask() for c in constrained))

    # ---- pages while decoding -----------------------------------------------------------------------

    def _grow(self, decoding: list[Choice]) -> None:
        """Give every decoding choice the page its next step writes into, preempting the most recently
        admitted request while none is available."""
        for choice in decoding:
            while choice.status is Status.DECODING and not self.kv.grow(choice.slot, choice.position):
                self._preempt(max(self._groups.values(), key=lambda g: g.admission))

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
            self._releases.append(choice.slot)
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
            self.kv.free(choice.slot)
        choice.slot = None

    def _finish(self, choice: Choice, reason: str) -> None:
        choice.matcher = None
        self._free(choice)
        choice.group.finish(choice, reason)
        if choice.group.ended:
            self._groups.pop(choice.group.req.request_id, None)
