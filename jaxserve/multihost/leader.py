"""Process 0 of a group: the hooks its runner calls, so that every plan reaches the others before it runs
here (the same steps, in the same order, everywhere), and what happens when another process is lost."""

from __future__ import annotations

import logging
import time

from jaxserve.engine.plan import SamplePlan, StepPlan, encode, encode_sample
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.types import EngineStopped
from jaxserve.multihost.channel import IDLE, SAMPLE, STEP, Channel
from jaxserve.multihost.group import Group, exit_hard

log = logging.getLogger(__name__)

ANSWER_GRACE = 1.0  # seconds the failed requests' answers get to go out before the process ends


class Leader:
    def __init__(self, channel: Channel, vocab_size: int):
        self.channel, self.words = channel, (vocab_size + 31) // 32

    def step(self, plan: StepPlan) -> None:
        self.channel.send(STEP, encode(plan, self.words))

    def sample(self, plan: SamplePlan) -> None:
        self.channel.send(SAMPLE, encode_sample(plan, self.words))

    def idle(self) -> None:
        self.channel.send(IDLE)


def lead(scheduler: Scheduler, group: Group) -> None:
    """Make `scheduler` (not started yet) the group's: its runner ships each plan, and a lost process ends
    every open request (a 503; a started stream: an error event, then [DONE]), turns the probes 503 and
    ends this process, non-zero, within the watchdog's bound: JAX would abort it later, answering no one."""
    scheduler.core.group = Leader(group.channel, scheduler.core.vocab_size)  # type: ignore[attr-defined]

    def lost(reason: str) -> None:
        scheduler.close(EngineStopped(f"a process of the serving group failed: {reason}"), failed=True)
        time.sleep(ANSWER_GRACE)
        exit_hard(reason)

    group.on_lost = lost
