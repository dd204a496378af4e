"""The two ways to wait for a request's results from the scheduler thread: `generate` for asyncio (the
server) and `stream` for a blocking caller (the command line, scripts, tests). Both hand the scheduler a
callback that puts into a queue the caller waits on, so nothing polls; leaving either early aborts the
request in the engine.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator, Sequence

from jaxserve.engine.lifecycle import END
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.types import Delta, EngineRequest, Usage


async def generate(scheduler: Scheduler, reqs: Sequence[EngineRequest]) -> AsyncIterator[tuple[int, Delta | Usage]]:
    """(i, item) for the items of reqs[i] as they come: its deltas, then its Usage. The requests are
    submitted together (RequestError, QueueFull and EngineStopped are raised before any runs); an error
    of one, or the caller leaving, aborts the rest."""
    loop = asyncio.get_running_loop()
    results: asyncio.Queue = asyncio.Queue()
    scheduler.submit(reqs, lambda i, item: loop.call_soon_threadsafe(results.put_nowait, (i, item)))
    running = len(reqs)
    try:
        while running:
            i, item = await results.get()
            if item is END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        if running:
            for req in reqs:
                scheduler.abort(req.request_id)


def stream(scheduler: Scheduler, req: EngineRequest, timeout: float | None = None) -> Iterator[Delta | Usage]:
    """A request's deltas, then its Usage, blocking between them (`timeout` seconds at most each)."""
    results: queue.Queue = queue.Queue()
    scheduler.submit([req], lambda _, item: results.put(item))
    finished = False
    try:
        while (item := results.get(timeout=timeout)) is not END:
            if isinstance(item, BaseException):
                finished = True
                raise item
            yield item
        finished = True
    finally:
        if not finished:
            scheduler.abort(req.request_id)


def complete(scheduler: Scheduler, req: EngineRequest, timeout: float | None = None) -> tuple[list[Delta], Usage]:
    """Every delta of a request, and its usage."""
    items = list(stream(scheduler, req, timeout))
    return [i for i in items if isinstance(i, Delta)], next(i for i in items if isinstance(i, Usage))
