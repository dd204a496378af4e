"""The engine's inbox: requests and aborts arrive here from any thread; the scheduler's thread drains them.
Requests are queued all or none, within the waiting bound, and never after the engine has closed."""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable

from jaxserve.engine.lifecycle import Group
from jaxserve.engine.types import EngineStopped, QueueFull, RequestError


class Intake:
    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._lock = threading.Lock()  # put vs. close: nothing is queued after the engine stops
        self._closed = False
        self._inbox: queue.Queue = queue.Queue()
        self._aborts: queue.Queue = queue.Queue()
        self.waiting: collections.deque[Group] = collections.deque()  # drained, not admitted (scheduler thread)

    # ---- any thread ---------------------------------------------------------------------------------

    def check(self, count: int) -> None:
        if count > self.max_waiting:  # could never be queued: a client error, not a reason to retry
            raise RequestError(
                f"a request may hold at most {self.max_waiting} prompts (the server's waiting bound), got {count}",
                "prompt",
            )

    def put(self, groups: list[Group], error: BaseException | None) -> None:
        """Queue every group or none (EngineStopped, with the engine's `error`; QueueFull)."""
        with self._lock:
            if self._closed:
                raise EngineStopped("the engine is not running" + (f": {error}" if error else ""))
            if self.depth + len(groups) > self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            for group in groups:
                self._inbox.put(group)

    def abort(self, request_id: str) -> None:
        self._aborts.put(request_id)

    def wake(self) -> None:
        self._inbox.put(None)

    @property
    def depth(self) -> int:
        return self._inbox.qsize() + len(self.waiting)

    # ---- the scheduler thread -----------------------------------------------------------------------

    def drain(self, block: bool, on_wait: Callable[[], None] = lambda: None) -> None:
        """Move what arrived into `waiting`; with `block`, wait for something first (calling `on_wait()` if
        nothing has arrived yet)."""
        if block and self._inbox.empty():
            on_wait()
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if item is not None:  # None: a wake-up
                    self.waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def aborted(self) -> list[str]:
        ids = []
        while True:
            try:
                ids.append(self._aborts.get_nowait())
            except queue.Empty:
                return ids

    def close(self) -> list[Group]:
        """Refuse everything from now on; returns (and forgets) every group still waiting."""
        with self._lock:
            self._closed = True
        self.drain(block=False)
        waiting = list(self.waiting)
        self.waiting.clear()
        return waiting
