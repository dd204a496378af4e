"""The frames a group's leader sends its followers, without processes: a plan packed into bytes, carried in
fixed-size chunks by a broadcast (here a queue), unpacked equal; and an idle group woken through the
key-value store (here a dict), never parked in a broadcast."""

import collections
import threading

import numpy as np
from test_plan import WORDS, same

from jaxserve.engine.plan import (
    Decode,
    PrefillRow,
    SamplePlan,
    Start,
    StepPlan,
    decode,
    decode_sample,
    encode,
    encode_sample,
)
from jaxserve.engine.types import SamplingParams
from jaxserve.multihost.channel import CHUNK, IDLE, SAMPLE, STEP, STOP, WAKE, Channel, pack, unpack


class Wire:
    """One broadcast: the leader's chunk reaches the follower's call; a follower calling while the leader
    sends nothing would block here, as in a collective (the tests check it never does when idle)."""

    def __init__(self):
        self.chunks: collections.deque = collections.deque()
        self.sizes: list[int] = []

    def leader(self, chunk):
        self.sizes.append(chunk.size)
        self.chunks.append(chunk.copy())
        return chunk

    def follower(self, chunk):
        assert self.chunks, "a follower is parked in a broadcast with nothing sent"
        self.sizes.append(chunk.size)
        return self.chunks.popleft()


class Store:
    """The coordination service's key-value store: blocking gets time out."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.changed = threading.Condition()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.changed:
            self.values[key] = value
            self.changed.notify_all()

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.values, timeout_in_ms / 1000):
                raise TimeoutError(key)
            return self.values[key]


def channels():
    wire, store = Wire(), Store()
    return Channel(store, True, wire.leader), Channel(store, False, wire.follower), wire, store


def test_a_plan_packed_into_bytes_comes_back_equal():
    plan = StepPlan(table=np.arange(6, dtype=np.int32).reshape(2, 3), decode=Decode(5, 1, masks=False))
    kind, buffers = unpack(pack(STEP, encode(plan, WORDS)))
    assert kind == STEP and same(decode(buffers), plan)


def test_frames_arrive_in_order_in_chunks_of_one_shape():
    leader, follower, wire, _ = channels()
    mask = np.arange(WORDS, dtype=np.int32)
    bias = tuple((t, 0.5) for t in range(300))
    big = StepPlan(
        table=np.zeros((4, 8), np.int32),
        prefill=(PrefillRow(0, list(range(700)), 0, list(range(700))),),
        starts=(Start(0, SamplingParams(logit_bias=bias), 700, 9, True, mask, logits_row=0),),
    )
    small = StepPlan(table=np.zeros((4, 8), np.int32), decode=Decode(3, 0))
    leader.send(STEP, encode(big, WORDS))
    leader.send(STEP, encode(small, WORDS))
    leader.send(SAMPLE, encode_sample(SamplePlan((0,), (mask,)), WORDS))
    kind, buffers = follower.receive()
    assert kind == STEP and same(decode(buffers), big)
    kind, buffers = follower.receive()
    assert kind == STEP and same(decode(buffers), small)
    kind, buffers = follower.receive()
    assert kind == SAMPLE and decode_sample(buffers).slots == (0,)
    chunks = -(-len(pack(STEP, encode(big, WORDS))) // CHUNK)
    assert chunks > 1 and set(wire.sizes) == {CHUNK} and len(wire.sizes) == 2 * (chunks + 2)  # sent, received
    assert leader.sent == follower.sent == 3


def test_an_idle_follower_waits_on_the_store_until_work_comes():
    leader, follower, wire, store = channels()
    leader.send(IDLE)
    assert follower.receive()[0] == IDLE
    got = []
    thread = threading.Thread(target=lambda: got.append(follower.receive()))
    thread.start()
    thread.join(1.5)  # more than one bounded wait: still waiting, on the store (a broadcast would assert)
    assert thread.is_alive() and not got
    leader.send(STEP, encode(StepPlan(table=np.zeros((1, 1), np.int32)), WORDS))
    thread.join(5)
    assert got and got[0][0] == STEP and WAKE.format(0) in store.values


def test_a_stopping_follower_leaves_its_idle_wait():
    leader, follower, _, _ = channels()
    leader.send(IDLE)
    follower.receive()
    assert follower.receive(stopping=lambda: True)[0] == STOP
