"""The device contract of continuous batching, as a type: everything the scheduler may ask of the device
side. It executes plans (`plan.StepPlan`, then `plan.SamplePlan` for the decode step the first one started)
and hands back what they produced.

The KV cache is a pool of `pages` pages of `page_size` positions. The caller decides which pages hold
which sequence: its page table, [slots, pages_per_seq] page ids (`pages` where none), row s for the sequence
in slot s, sent with every StepPlan.

`device.runner.JaxRunner` implements it with the jitted steps; the scheduler tests' fake runner implements
it with arithmetic a reader can check by hand. Calls return at once (device arrays, no host sync); `fetch`
turns an output into host arrays. No jax here: the contract is plain Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from jaxserve.engine.plan import PrefillRow, SamplePlan, Start, StepPlan

T = TypeVar("T")


class PrefillResult(Protocol):
    logprobs: Any  # [P, T] log p(targets) per position (zero unless scored)
    top_ids: Any  # [P, T, K] (K = types.TOP_LOGPROBS)
    top_logprobs: Any  # [P, T, K] (K = types.TOP_LOGPROBS)
    last_logits: Any  # [P, V] at each row's last real token


class StepResult(Protocol):
    tokens: Any  # [B] (insert: [1])
    logprobs: Any  # [B] the chosen token's logprob
    top_ids: Any  # [B, K]
    top_logprobs: Any  # [B, K]
    done: Any  # [B] the sequence ended with this token (EOS or max_tokens): the slot stopped on device
    valid: Any  # [B] the slot was decoding: the row is a real token


@dataclasses.dataclass
class Executed:
    """What a StepPlan left for the host to fetch (device arrays): its prefill's output, and each start's
    first token (an insert's; None for a resume), in the plan's order."""

    prefill: PrefillResult | None
    starts: Sequence[StepResult | None]


@runtime_checkable
class Runner(Protocol):
    slots: int  # B: sequences decoded at once
    cache_len: int  # positions per sequence
    pages: int  # pages in the KV pool
    page_size: int  # positions per page
    pages_per_seq: int  # columns of a page table
    chunk: int  # the most prompt tokens one prefill row takes
    eos_ids: tuple[int, ...]  # every id that ends a generation (empty: none)
    vocab_size: int  # V: a grammar mask row is ceil(V/32) int32 words
    max_loras: int  # LoRA adapters resident at once, indices 1..max_loras (0: none served)

    def packing(self, count: int, longest: int) -> tuple[int, int] | None:
        """The packed prefill shape (rows, tokens) for `count` whole prompts of at most `longest`
        tokens, or None if they do not fit one call."""

    def execute(self, plan: StepPlan) -> Executed:
        """Run the plan's parts in their order: releases, prefill (several whole prompts packed, or one
        prompt's chunk), copies, starts, then the model's half of a decode step over the first
        max_slot + 1 slots, its logits left on the device for `sample_tokens`."""

    def sample_tokens(self, plan: SamplePlan) -> StepResult:
        """Write the plan's masks, then the decode step's tokens from the last plan's logits, each slot under
        the mask it has now. Output rows cover at least the first max_slot + 1 slots."""

    def idle(self) -> None:
        """The scheduler waits for requests, nothing in flight (a group's other processes wait too)."""

    def fetch(self, result: T) -> T:
        """A step's or prefill's output as host arrays (waits for the device)."""

    def stats(self) -> dict:
        """The device side's own counters, by their names in types.EngineStats (those it keeps; any thread)."""

    def read_adapter(self, name: str, path: str) -> Any:
        """The LoRA adapter in directory `path`, read on the host and checked against the model (any thread);
        RequestError naming what is wrong."""

    def load_adapter(self, index: int, adapter: Any) -> None:
        """Make `adapter` (from read_adapter) LoRA adapter `index`, which no slot uses now (any thread)."""


class Steps(Protocol):
    """The device calls a StepPlan is made of: each runner's primitives, which `walk` calls in order."""

    def release(self, slot: int) -> None: ...

    def prefill(self, rows: list[PrefillRow], table: Any, score: bool) -> Any: ...

    def copy_page(self, src: int, dst: int) -> None: ...

    def insert(self, start: Start, logits: Any) -> Any: ...

    def resume(self, start: Start) -> None: ...

    def forward(self, table: Any, max_position: int, max_slot: int) -> Any: ...


def walk(plan: StepPlan, steps: Steps) -> tuple[Executed, Any]:
    """Run the plan's parts in their one order (see Runner.execute) as calls of `steps`; returns what it left
    for the host, and the decode step's logits for the SamplePlan (None: no decode)."""
    for slot in plan.releases:
        steps.release(slot)
    prefill = steps.prefill(list(plan.prefill), plan.table, plan.score) if plan.prefill else None
    for src, dst in plan.copies:
        steps.copy_page(src, dst)
    started = []
    for s in plan.starts:
        if s.inserts:
            assert prefill is not None, "an insert samples from its plan's prefill"
            started.append(steps.insert(s, prefill.last_logits[s.logits_row]))
        else:
            steps.resume(s)
            started.append(None)
    d = plan.decode
    logits = None if d is None else steps.forward(plan.table, d.max_position, d.max_slot)
    return Executed(prefill, started), logits
