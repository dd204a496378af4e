"""Joining a group: this process's place in it, JAX's runtime started with bounded timeouts, the watchdog.

The checkpoint is prepared before the group forms (a GGUF converted in a spawned child: this process may not
start a JAX backend before `jax.distributed.initialize`). Converting holds a lock file in the checkpoint
folder's parent: on a filesystem the hosts share, the first process converts and the others wait, then
find it; on one of their own, each host converts its own copy (the same bytes: conversion is
deterministic). Every process then restores only its own devices' shards of it (orbax, onto the mesh).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

from jaxserve.multihost.channel import STOP, Channel
from jaxserve.multihost.watchdog import Watchdog

log = logging.getLogger(__name__)

INIT_TIMEOUT = 120  # seconds for every process to join: a missing one is then an error, not a 5-minute wait


@dataclasses.dataclass
class Group:
    process_id: int
    num_processes: int
    heartbeat_timeout: float
    channel: Channel
    on_lost: Callable[[str], None]  # a process is dead or hung (process 0 replaces it once it serves)
    watchdog: Watchdog | None = None

    @property
    def leader(self) -> bool:
        return self.process_id == 0


_joined: Group | None = None  # this process's group, once joined


def current() -> Group | None:
    return _joined


def exit_hard(reason: str) -> None:
    """End this process now, non-zero: waiting for JAX's own shutdown could hang on a dead peer."""
    log.error("leaving the group: %s", reason)
    logging.shutdown()
    os._exit(1)


def join(coordinator: str | None, num_processes: int | None, process_id: int | None, heartbeat_timeout: float) -> Group:
    """Start JAX's multi-controller runtime: at `coordinator` (HOST:PORT, which process 0 binds) as process
    `process_id` of `num_processes`, or (coordinator None) wherever jax detects (a Cloud TPU slice, SLURM).
    JAX's own heartbeat and shutdown bounds lie above `heartbeat_timeout`, jaxserve's watchdog, which
    starts here: it fires first."""
    global _joined
    import jax
    from jax._src import distributed

    # coordinator_bind_address: the address given, not every interface; JAX's own bounds (seconds) above ours
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        coordinator_bind_address=coordinator,
        initialization_timeout=INIT_TIMEOUT,
        heartbeat_timeout_seconds=int(3 * heartbeat_timeout) + 10,
        shutdown_timeout_seconds=int(heartbeat_timeout) + 10,
    )
    client = distributed.global_state.client  # the coordination service: key-value store, no public handle
    me, count = jax.process_index(), jax.process_count()
    channel = Channel(client, leader=me == 0)
    _joined = Group(me, count, heartbeat_timeout, channel, exit_hard)
    group = _joined
    group.watchdog = Watchdog(
        client, me, count, heartbeat_timeout, lambda reason: group.on_lost(reason), lambda: channel.sent
    ).start()
    log.info("process %d of %d joined (%d devices, %d here)", me, count, jax.device_count(), jax.local_device_count())
    return _joined


def leave(code: int) -> int:
    """The end of a command: in a group, process 0 tells the others to stop (code 0) and JAX's runtime shuts
    down; any other code ends this process hard (the others' watchdogs see it go)."""
    if _joined is None:
        return code
    if code != 0:
        exit_hard(f"exit status {code}")
    if _joined.leader:
        _joined.channel.send(STOP)
    if _joined.watchdog is not None:
        _joined.watchdog.stop()
    import jax

    jax.distributed.shutdown()
    return 0


def prepare_checkpoint(ensure: Callable[[], object], lock_dir: Path) -> None:
    """Run `ensure()` (which converts the checkpoint if it is missing) in a spawned child, holding the lock."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".jaxserve-convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        child = multiprocessing.get_context("spawn").Process(target=ensure, name="jaxserve-convert")
        child.start()
        child.join()
    if child.exitcode != 0:
        raise ValueError(f"preparing the checkpoint failed (exit status {child.exitcode}); see the log above")
