"""A request's life on the host, as explicit states: what it has produced and what it still owes its
caller. No device calls here: the scheduler moves requests between states and owns the slots.

    Group (one EngineRequest)   WAITING -> PREFILLING -> DECODING -> FINISHED
                                   ^  \\________________\\__________-> ABORTED
                                   |______(preempted)_____/
    Choice (one sequence of it) WAITING (until its tokens are in its pages) -> DECODING -> FINISHED
                                   ^_____(preempted)_____/

A preempted group goes back to the queue keeping what it has produced; its unfinished choices are
recomputed (prompt and generated tokens) when it is admitted again, and go on as if never interrupted.

Everything a group emits goes through `emit`: Delta ..., then Usage, then END (a finished group); or
only END (aborted); or the exception, then END (the engine failed). best_of holds every candidate's
deltas until all have finished, then emits the n best.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import time
from collections.abc import Callable

from jaxserve.engine.adapters import AdapterEntry
from jaxserve.engine.kv import KVManager
from jaxserve.engine.pages import CachedPage
from jaxserve.engine.text import ChoiceText
from jaxserve.engine.types import Delta, EngineRequest, TokenInfo, Usage
from jaxserve.tokenizer import Tokenizer

END = object()  # the last item a request emits


class Status(enum.Enum):
    WAITING = "waiting"  # queued (a group), or not yet inserted (a choice)
    PREFILLING = "prefilling"  # slots reserved; the prompt is going into the cache chunk by chunk
    DECODING = "decoding"  # inserted: its slot decodes on device
    FINISHED = "finished"  # ended normally (stop, length); everything emitted
    ABORTED = "aborted"  # cancelled by the caller, or the engine stopped


class Choice:
    """One generated sequence: choice `index` of its group, in `slot` while it holds one."""

    def __init__(self, group: Group, index: int, tokenizer: Tokenizer, seed: int):
        self.group, self.index, self.seed = group, index, seed
        self.status = Status.WAITING
        self.text = ChoiceText(tokenizer, group.req.stop)
        self.slot: int | None = None  # its pages are that slot's in the KV manager
        self.lease = 0  # counts the slots it has given back (a preempted choice may get the same slot again)
        self.generated: list[int] = []  # every token taken, EOS included
        # a grammar.Matcher while a constrained choice decodes (set at insert; the scheduler feeds it each
        # token as soon as it is fetched, ahead of take_token; kept through a preemption)
        self.matcher = None
        self.position = 0  # an upper bound of the slot's position on device (for the attention window)
        self.count = 0  # tokens generated, EOS included
        self.logprob_sum = 0.0
        self._held: list[Delta] = []  # best_of: every delta, until the best candidates are known

    @property
    def params(self):
        return dataclasses.replace(self.group.req.sampling, seed=self.seed)

    def deliver(self, delta: Delta) -> None:
        if self.group.buffered:
            self._held.append(delta)
        else:
            self.group.emit(delta)

    def take_token(
        self, token: int, logprob: float, top: list[tuple[int, float]], eos_ids: tuple[int, ...]
    ) -> tuple[Delta, bool]:
        """Account for a generated token -> (its delta, whether it was EOS). EOS adds no text."""
        self.count += 1
        self.generated.append(token)
        self.logprob_sum += logprob
        if token in eos_ids and not self.group.req.ignore_eos:
            return Delta(self.index, "", []), True
        return Delta(self.index, self.text.add(token), [TokenInfo(token, logprob, top)]), False


class Group:
    """One request: its prompt's progress through prefill and its n (or best_of) choices."""

    def __init__(self, req: EngineRequest, emit: Callable, tokenizer: Tokenizer):
        self.req, self.emit, self.tokenizer = req, emit, tokenizer
        self.status = Status.WAITING
        self.arrived = time.monotonic()
        self.admitted: float | None = None  # set when the scheduler admits it into slots
        seeds = [
            random.getrandbits(31) if req.seed is None else (req.seed + 1_000_003 * j) & 0xFFFFFFFF
            for j in range(req.candidates)
        ]
        self.choices = [Choice(self, j, tokenizer, seeds[j]) for j in range(req.candidates)]
        self.echoed = False  # the prompt has gone out with its logprobs (not again after a preemption)
        self.preemptions = 0
        self.admission = 0  # the scheduler's count of admissions when it was last admitted
        self.overtaken = 0  # admissions of later requests while this one waited (see Scheduler._pick)
        self.adapter: AdapterEntry | None = None  # the LoRA adapter it is served with (None: the base)

    @property
    def adapter_index(self) -> int:
        """Its rows' adapter index on the device (0: the base)."""
        return 0 if self.adapter is None else self.adapter.index

    @property
    def cache_root(self) -> int:
        """The root of its prefix-cache keys: pages are shared only among requests of the same adapter."""
        return -1 if self.adapter is None else self.adapter.cache_root

    @property
    def unfinished(self) -> list[Choice]:
        return [c for c in self.choices if c.status is not Status.FINISHED]

    @property
    def slots_needed(self) -> int:
        """Scoring only (max_tokens 0) needs the prompt's slot; otherwise one per unfinished choice."""
        return len(self.unfinished) if self.req.max_tokens > 0 else 1

    @property
    def cost(self) -> int:
        """Slot-steps it will hold at most: what admission orders the waiting requests by."""
        return self.slots_needed * max(self.req.max_tokens, 1)

    @property
    def buffered(self) -> bool:
        return len(self.choices) > self.req.n

    @property
    def ended(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)

    def echo(self, rows: list[tuple[float, list[tuple[int, float]]]]) -> None:
        """Send the prompt to every choice with its logprobs: rows[j] = (log p(prompt[j + 1]), the top
        tokens there); the first token has none."""
        prompt = self.req.prompt_ids
        infos = [TokenInfo(prompt[0], None, [])] + [TokenInfo(prompt[j], *rows[j - 1]) for j in range(1, len(prompt))]
        text = self.tokenizer.decode(prompt)
        self.echoed = True
        for choice in self.choices:
            choice.deliver(Delta(choice.index, text, infos, None, echo=True))

    def finish(self, choice: Choice, reason: str) -> None:
        """`choice` ended with `reason`; the group finishes with its last choice."""
        choice.status = Status.FINISHED
        choice.deliver(Delta(choice.index, "", [], reason))
        if all(c.status is Status.FINISHED for c in self.choices):
            self._end()

    def _end(self) -> None:
        self.status = Status.FINISHED
        chosen = self.choices
        if self.buffered:  # best_of: the n candidates with the highest mean token logprob
            chosen = sorted(chosen, key=lambda c: -c.logprob_sum / max(c.count, 1))[: self.req.n]
            for new_index, choice in enumerate(chosen):
                for delta in choice._held:
                    self.emit(dataclasses.replace(delta, index=new_index))
        queued = None if self.admitted is None else self.admitted - self.arrived
        self.emit(Usage(len(self.req.prompt_ids), sum(c.count for c in chosen), queued))
        self.emit(END)

    def abort(self, error: BaseException | None = None) -> None:
        """End without a result: silently (the caller left), or with the error that stopped the engine."""
        if self.ended:
            return
        self.status = Status.ABORTED
        for choice in self.choices:
            if choice.status is not Status.FINISHED:
                choice.status = Status.ABORTED
        if error is not None:
            self.emit(error)
        self.emit(END)


@dataclasses.dataclass(eq=False)
class Fill:
    """A sequence's tokens going into its pages, chunk by chunk: a group's prompt (then shared by its
    choices), or a preempted choice's prompt and generated tokens but the last."""

    group: Group
    choice: Choice  # whose slot and pages
    tokens: list[int]
    start: int  # the next position to compute
    cached: int  # positions before this are in shared cached pages: computed again at most, never written
    chain: list[CachedPage]  # the cache entries of its first full pages, in order
    rows: list  # echo: the rows its cached pages kept (positions 0 .. cached - 2)
    score: bool  # echo: every position's logprob is wanted
    scored: list = dataclasses.field(default_factory=list)  # (prefill output, row, length) of each chunk (echo)

    def targets(self, start: int, length: int) -> list[int]:
        """The tokens positions start.. predict (0 past the end), for echo logprobs."""
        return list(self.tokens[start + 1 : start + 1 + length]) + [0] * (start + length >= len(self.tokens))

    def echo(self, fetch: Callable, page_size: int) -> None:
        """Send the prompt with its logprobs: rows of cached pages, then of the chunks computed (`fetch`ed
        now); pages filled here keep theirs for later hits."""
        rows = list(self.rows)
        for out, row, length in self.scored:
            out = fetch(out)
            top = lambda t, out=out, row=row: list(zip(out.top_ids[row, t].tolist(), out.top_logprobs[row, t].tolist()))
            rows += [(float(out.logprobs[row, t]), top(t)) for t in range(length)]
        S = page_size
        for i, entry in enumerate(self.chain):
            if entry.rows is None:
                entry.rows = rows[max(i * S - 1, 0) : (i + 1) * S - 1]
        self.group.echo(rows)

    def filled(self, length: int, kv: KVManager) -> None:
        """The next `length` positions went in; full pages are cached."""
        self.start += length
        S = kv.page_size
        while len(self.chain) < self.start // S:
            i = len(self.chain)
            before = self.chain[-1] if self.chain else None
            entry = kv.publish(self.choice.slot, i, before, self.tokens[i * S : (i + 1) * S], self.group.cache_root)
            if entry is None:
                break
            self.chain.append(entry)
