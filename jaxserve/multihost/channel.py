"""Frames from process 0 to every other process of the group: a step's plan (`engine.plan`'s named buffers)
or a control word, as bytes carried by a JAX collective over every device (`broadcast_one_to_all`: the
leader's bytes summed with the others' zeros).

A frame travels in chunks of CHUNK bytes, one collective each, all of one shape (so nothing compiles after
the first): a decode step's plan fits one. Its bytes are a header (kind, meta length, body length), the
buffers' names, dtypes and shapes as JSON, then their bytes.

An idle group is not parked inside a collective (XLA:CPU's collectives time out after 30 minutes): the
leader sends IDLE, and the others wait on the coordination service's key-value store, in bounded waits,
for the key the leader sets when work comes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np

STEP, SAMPLE, IDLE, STOP = range(4)
CHUNK = 8192  # bytes a collective carries: a decode step's plan for 64 slots of 2048 tokens fits in one
HEAD = 3 * 8  # int64 kind, meta length, body length
WAKE = "jaxserve/wake/{}"
WAIT_MS = 1000  # one bounded wait of an idle process for the leader's wake-up key


def pack(kind: int, buffers: dict[str, np.ndarray]) -> bytes:
    meta = json.dumps([[name, a.dtype.str, list(a.shape)] for name, a in buffers.items()]).encode()
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in buffers.values())
    return np.array([kind, len(meta), len(body)], np.int64).tobytes() + meta + body


def unpack(data: bytes) -> tuple[int, dict[str, np.ndarray]]:
    kind, n_meta, _ = np.frombuffer(data[:HEAD], np.int64).tolist()
    buffers, at = {}, HEAD + n_meta
    for name, dtype, shape in json.loads(data[HEAD : HEAD + n_meta]):
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        buffers[name] = np.frombuffer(data[at : at + size], dtype).reshape(shape)
        at += size
    return kind, buffers


class Channel:
    """Process 0 sends, the others receive, each frame in the same order everywhere. `client`: the
    coordination service's client (jax.distributed); `broadcast`: bytes from process 0 to all (the others
    pass zeros)."""

    def __init__(self, client, leader: bool, broadcast: Callable[[np.ndarray], np.ndarray] | None = None):
        self.client, self.leader = client, leader
        self._broadcast = broadcast or _broadcast_one_to_all
        self.sent = 0  # frames (the leader's count; a follower's: received)
        self._parked = False  # the others wait on the key-value store (after IDLE)
        self._wakes = 0

    def send(self, kind: int, buffers: dict[str, np.ndarray] | None = None) -> None:
        assert self.leader
        if self._parked:
            self.client.key_value_set(WAKE.format(self._wakes), "1")
            self._wakes, self._parked = self._wakes + 1, False
        data = pack(kind, buffers or {})
        for at in range(0, len(data), CHUNK):
            chunk = np.zeros(CHUNK, np.uint8)
            piece = np.frombuffer(data[at : at + CHUNK], np.uint8)
            chunk[: len(piece)] = piece
            self._broadcast(chunk)
        self.sent += 1
        self._parked = kind == IDLE

    def receive(self, stopping: Callable[[], bool] = lambda: False) -> tuple[int, dict[str, np.ndarray]]:
        """The next frame; after IDLE, first the wake-up (waits until it comes or `stopping()`: then STOP)."""
        assert not self.leader
        if self._parked:
            if not self._await_wake(stopping):
                return STOP, {}
            self._parked = False
        first = self._broadcast(np.zeros(CHUNK, np.uint8)).tobytes()
        _, n_meta, n_body = np.frombuffer(first[:HEAD], np.int64).tolist()
        data, total = [first], HEAD + n_meta + n_body
        for _ in range(CHUNK, total, CHUNK):
            data.append(self._broadcast(np.zeros(CHUNK, np.uint8)).tobytes())
        kind, buffers = unpack(b"".join(data)[:total])
        self.sent += 1
        self._parked = kind == IDLE
        return kind, buffers

    def _await_wake(self, stopping: Callable[[], bool]) -> bool:
        key = WAKE.format(self._wakes)
        while not stopping():
            began = time.monotonic()
            try:
                self.client.blocking_key_value_get(key, WAIT_MS)
            except Exception:  # the wait's deadline (jax raises its runtime error): wait again; a service
                # gone answers at once: the watchdog ends this process, meanwhile it does not spin
                time.sleep(max(0.0, WAIT_MS / 2000 - (time.monotonic() - began)))
                continue
            self._wakes += 1
            return True
        return False


def _broadcast_one_to_all(chunk: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(chunk))
