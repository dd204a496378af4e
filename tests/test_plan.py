"""Step plans as fixed-shape buffers: every plan the scheduler makes survives encode -> decode unchanged, and
a runner that executes only the decoded copies serves exactly what the plain one does."""

import dataclasses
import threading

import numpy as np
from fake_core import VOCAB, FakeCore
from test_scheduler import ToyTokenizer, req, text_of

from jaxserve.engine.bridge import complete
from jaxserve.engine.plan import (
    Decode,
    PrefillRow,
    SamplePlan,
    Start,
    StepPlan,
    bucket,
    decode,
    decode_sample,
    encode,
    encode_sample,
)
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.types import SamplingParams

WORDS = (VOCAB + 31) // 32


def same(a: StepPlan, b: StepPlan) -> bool:
    def fields(plan):
        starts = [(dataclasses.replace(s, mask=None), None if s.mask is None else s.mask.tolist()) for s in plan.starts]
        return plan.releases, plan.prefill, plan.score, plan.copies, plan.decode, starts

    return np.array_equal(a.table, b.table) and fields(a) == fields(b)


def test_every_part_of_a_plan_round_trips():
    mask = np.array([5, -1], np.int32)
    bias = tuple((t, float(t) / 4) for t in range(300))  # as many pairs as OpenAI allows
    plan = StepPlan(
        table=np.arange(12, dtype=np.int32).reshape(3, 4),
        releases=(2, 0),
        prefill=(PrefillRow(1, [4, 5, 6], 8, [5, 6, 0], 4, adapter=3), PrefillRow(0, [9], 0, [0])),
        score=True,
        copies=((3, 7),),
        starts=(
            Start(1, SamplingParams(0.7, 0.9, 0.1, 0.2, bias, 2**32 - 1), 11, 5, True, mask, logits_row=0),
            Start(2, SamplingParams(0.0), 6, 3, False, token=42, generated=(40, 41, 42), adapter=2),
        ),
        decode=Decode(max_position=11, max_slot=2),
    )
    buffers = encode(plan, WORDS)
    assert same(decode(buffers), plan)
    assert buffers["bias_ids"].shape == (512,) and buffers["starts"].shape == (2, 10)  # counts rounded up
    assert same(decode(encode(StepPlan(table=plan.table), WORDS)), StepPlan(table=plan.table))
    unmasked = dataclasses.replace(plan, decode=Decode(max_position=11, max_slot=2, masks=False))
    assert decode(encode(unmasked, WORDS)).decode == Decode(11, 2, masks=False)  # no SamplePlan will follow
    sample = SamplePlan((3, 1), (mask, mask + 1))
    back = decode_sample(encode_sample(sample, WORDS))
    assert back.slots == (3, 1) and [m.tolist() for m in back.masks] == [[5, -1], [6, 0]]


class ShippedCore(FakeCore):
    """Executes each plan only as decoded from its buffers, as a process that received them would; keeps
    every plan and the payload shapes it saw."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.plans: list[StepPlan] = []
        self.shapes: set[tuple] = set()

    def execute(self, plan):
        buffers = encode(plan, WORDS)
        self.shapes |= {(name, a.shape) for name, a in buffers.items()}
        shipped = decode(buffers)
        assert same(shipped, plan)
        self.plans.append(plan)
        return super().execute(shipped)

    def sample_tokens(self, plan):
        return super().sample_tokens(decode_sample(encode_sample(plan, WORDS)))


def workload(core) -> dict:
    """n, echo over chunks, logit_bias, a stop string and preemption (8 pages of 4 for 4 growing sequences)."""
    eng = Scheduler(core, ToyTokenizer()).start()
    results = {}

    def run(i):
        sampling = SamplingParams(temperature=0.0, logit_bias=((i, 1.0), (7, -2.0)))
        r = req(f"r{i}", [10 * i, 10 * i + 1], max_tokens=14, n=1 + (i == 1), echo=i == 2, stop=("<27>",))
        results[i] = complete(eng, dataclasses.replace(r, sampling=sampling), timeout=30)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        results["preemptions"] = eng.preemptions
        results["long"] = complete(eng, req("long", range(11), max_tokens=2, echo=True), timeout=30)
    finally:
        eng.shutdown()
    return results


def test_a_runner_of_shipped_plans_serves_what_the_plain_one_does():
    plain, shipped = FakeCore(pages=8), ShippedCore(pages=8)
    want, got = workload(plain), workload(shipped)
    assert got["preemptions"] >= 1 and any(s.generated for p in shipped.plans for s in p.starts)  # resumed
    for i in range(3):
        assert [text_of(got[i][0], j) for j in range(2)] == [text_of(want[i][0], j) for j in range(2)]
    assert text_of(got[1][0], 1) and got[2][0][0].echo and text_of(got[2][0]) == "<22><23><24><25><26>"
    assert text_of(got["long"][0]) == text_of(want["long"][0]) == "<11><12>"
    for name, shape in shipped.shapes:  # payloads of power-of-two rows; the header and table fixed
        assert name in ("header", "table") or shape[0] == bucket(shape[0]), (name, shape)
