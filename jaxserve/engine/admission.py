"""Admission: which requests the engine takes, and in which order. Pure policy over the waiting queue and
the KV manager; the scheduler admits what `pick` names.

A request the engine can never run is refused at submission (`validate`, naming the parameter). Among the
waiting requests that fit in the free slots and pages, the one that will hold the fewest slot-steps
(slots x max_tokens) goes first, ties in arrival order; so a short request is not kept waiting behind large
n/best_of requests for whole slot-sets to drain. A request overtaken `max_overtakes` times becomes a
barrier: nothing is admitted past it until it fits, so large requests are delayed by a bounded number of
admissions, never starved.
"""

from __future__ import annotations

import collections
import time

from jaxserve.engine.kv import KVManager
from jaxserve.engine.lifecycle import Group
from jaxserve.engine.types import ContextLengthError, EngineRequest, RequestError


def validate(req: EngineRequest, max_context: int, slots: int, kv: KVManager) -> None:
    """Raise RequestError (naming the parameter) for a request this engine can never run."""
    if not req.prompt_ids:
        raise RequestError("the prompt is empty", "prompt")
    total = len(req.prompt_ids) + req.max_tokens
    if total > max_context:
        raise ContextLengthError(
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{total} tokens ({len(req.prompt_ids)} in the prompt, {req.max_tokens} for the completion).",
            "prompt",
        )
    which = "best_of" if req.best_of and req.best_of > req.n else "n"
    if req.candidates > slots:
        raise RequestError(f"n and best_of can be at most {slots} (the engine's slots)", which)
    # alone in the pool, a request must fit whole (so preempting the others always lets it finish)
    pages, pool = req.candidates * kv.pages_for(total), kv.pool
    if pages > pool.pages:
        raise ContextLengthError(
            f"the KV cache holds {pool.pages * pool.page_size} tokens; {req.candidates} sequence(s) of {total} "
            f"tokens need {pages * pool.page_size} in pages of {pool.page_size}",
            which if req.candidates > 1 else "prompt",
        )


def fresh(group: Group) -> bool:
    """No choice has generated anything yet: one prefill of the prompt, shared by every choice."""
    return not any(c.generated for c in group.choices)


def pages_needed(group: Group, kv: KVManager) -> int:
    """Pages the group's prefill takes at most (no cache hits counted): its prompt's, and a copy of the
    partial last page for each further choice; or, resumed, every unfinished choice's tokens."""
    prompt = group.req.prompt_ids
    if fresh(group):
        return kv.pages_for(len(prompt)) + (len(prompt) % kv.page_size > 0) * (group.slots_needed - 1)
    return sum(kv.pages_for(len(prompt) + max(len(c.generated) - 1, 0)) for c in group.unfinished)


def pick(waiting: collections.deque[Group], free: int, kv: KVManager, max_overtakes: int) -> Group | None:
    """The next waiting request to admit into `free` slots and the available pages, or None."""
    fits = lambda g: g.slots_needed <= free and pages_needed(g, kv) <= kv.available
    barrier = next((g for g in waiting if g.overtaken >= max_overtakes), None)
    if barrier is not None:
        return barrier if fits(barrier) else None
    fitting = [g for g in waiting if fits(g)]
    return min(fitting, key=lambda g: g.cost) if fitting else None  # min keeps the first of equal costs


def take(waiting: collections.deque[Group], group: Group) -> Group:
    """Remove `group` from the waiting queue, counting an overtake for each request that came before it."""
    for earlier in waiting:
        if earlier is group:
            break
        earlier.overtaken += 1
    waiting.remove(group)
    if group.admitted is None:
        group.admitted = time.monotonic()
    return group
