"""Every process of a group but process 0: no port, no scheduler; it runs the plans process 0 sends on its
own devices' shards, through a runner built from the same flags, and never reads a result.

SIGTERM (Kubernetes sends it to every pod of a group at once): a follower keeps running plans, so that
process 0, stopping on its own SIGTERM, can drain its requests and then send STOP; if STOP has not come
`grace` seconds later, the follower ends non-zero (and process 0's watchdog then ends the group).
"""

from __future__ import annotations

import logging
import signal
import threading

from jaxserve.device.runner import JaxRunner
from jaxserve.engine.plan import SamplePlan, decode, decode_sample
from jaxserve.multihost.channel import IDLE, SAMPLE, STEP, STOP
from jaxserve.multihost.group import Group, exit_hard

log = logging.getLogger(__name__)


def follow(runner: JaxRunner, group: Group, grace: float) -> int:
    """Run process 0's plans until it sends STOP (0); a failure here ends this process hard."""
    channel = group.channel

    def run() -> None:
        try:
            while True:
                kind, buffers = channel.receive()
                if kind == STEP:
                    plan = decode(buffers)
                    runner.execute(plan)
                    if plan.decode is not None and not plan.decode.masks:  # no SamplePlan follows: it has none
                        runner.sample_tokens(SamplePlan())
                elif kind == SAMPLE:
                    runner.sample_tokens(decode_sample(buffers))
                elif kind == STOP:
                    return
                else:
                    assert kind == IDLE, kind
        except BaseException as e:  # an exception left to unwind would hang the group in its next collective
            log.exception("follower failure")
            exit_hard(f"follower failure: {e!r}")

    worker = threading.Thread(target=run, name="jaxserve-follower", daemon=True)
    worker.start()

    def terminate(signum, frame) -> None:
        log.info("SIGTERM: following until process 0 stops the group, at most %.0f s", grace)
        timer = threading.Timer(grace, exit_hard, args=("no STOP from process 0 after SIGTERM",))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, terminate)  # the main thread waits below, so the handler runs at once
    log.info("process %d following process 0's plans", group.process_id)
    while worker.is_alive():
        worker.join(0.5)
    return 0
