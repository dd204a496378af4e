"""jaxserve's own watchdog over a group: JAX notices a dead peer only while a collective is in flight, a hung
one not at all, and then ends the survivors with an abort at its heartbeat timeout. So every process writes
a beat to the coordination service's key-value store (a counter, and the frames it has completed), and
reads its peers' (process 0 reads every other; the others read process 0's):

    dead or stopped    its beat stops changing (a leader's death takes the service with it: the reads
                       fail, which counts the same)
    hung in a step     it beats but its completed frames stay behind the leader's sent ones

for 0.6 x `timeout` seconds, so that the process that notices can answer and end within `timeout`.

Then `on_failure(reason)` runs once, on the watchdog's thread. The reads run on a thread of their own: a
read that never returns (the service's process stopped) is a stale beat too. `stop()` ends the threads before
JAX's runtime shuts down: a call into the client after that ends the process with an uncaught C++ exception.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

BEAT = "jaxserve/beat/{}"


class Watchdog:
    def __init__(
        self,
        client,
        process_id: int,
        num_processes: int,
        timeout: float,
        on_failure: Callable[[str], None],
        frames: Callable[[], int],
    ):
        """`frames()`: frames this process has completed (a follower) or sent (the leader)."""
        self.client, self.process_id, self.timeout = client, process_id, timeout
        self.peers = list(range(1, num_processes)) if process_id == 0 else [0]
        self.on_failure, self.frames = on_failure, frames
        self.interval = timeout / 10
        self.stale = 0.6 * timeout  # detected by 0.7 x timeout: the lost leader's answers go out and it ends within it
        now = time.monotonic()
        self._seen = {p: ("", now) for p in self.peers}  # last beat read, when it last changed
        self._behind = {p: now for p in self.peers}  # since when a follower completed no frame, behind (leader)
        self._done: dict[int, int] = {}  # frames each follower had completed at its last beat read
        self._read_at = now  # the reader's last completed round
        self._stop = threading.Event()  # stopped, or failed: every thread ends
        self._threads = [
            threading.Thread(target=target, name=f"jaxserve-watchdog-{name}", daemon=True)
            for target, name in ((self._beat, "beat"), (self._read, "read"), (self._check, "check"))
        ]

    def start(self) -> Watchdog:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """End the threads (each within one interval, a read in flight within its own bound)."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(2 * self.interval + 1)

    def _beat(self) -> None:
        tick = 0
        while not self._stop.is_set():
            try:
                self.client.key_value_set(BEAT.format(self.process_id), f"{tick}:{self.frames()}", allow_overwrite=True)
            except Exception:  # the service is gone: the reads say so
                pass
            tick += 1
            self._stop.wait(self.interval)

    def _read(self) -> None:
        while not self._stop.is_set():
            for p in self.peers:
                try:
                    value = self.client.key_value_try_get(BEAT.format(p))
                except Exception:  # not written yet, or the service is gone: the beat goes stale
                    continue
                now = time.monotonic()
                if value != self._seen[p][0]:
                    self._seen[p] = (value, now)
                done = int(value.split(":")[1])
                if self.process_id == 0 and (done != self._done.get(p) or done >= self.frames()):
                    self._behind[p], self._done[p] = now, done  # it completed a frame since, or all
            self._read_at = time.monotonic()
            self._stop.wait(self.interval)

    def _check(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            reason = None
            if now - self._read_at > self.stale:
                reason = "the coordination service stopped answering"
            for p in self.peers:
                if now - self._seen[p][1] > self.stale:
                    reason = f"process {p} has not beaten for {now - self._seen[p][1]:.0f} s (dead or stopped)"
                    break
                if self.process_id == 0 and now - self._behind[p] > self.stale:
                    reason = f"process {p} has not completed a step for {now - self._behind[p]:.0f} s (hung)"
            if reason is not None:
                self._stop.set()
                log.error("group failure: %s", reason)
                self.on_failure(reason)
                return
