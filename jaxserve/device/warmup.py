"""Warm-up: make every step variant a request can reach ready before (or while) a runner serves. Policy, kept
out of the runner (as tpu-inference keeps its compilation manager): which variants exist (found by making
each call of the runner with nothing run), which must be ready before the first request, in which order
the rest compile in the background, and the log line that says what happened.
"""

from __future__ import annotations

import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.device import steps
from jaxserve.device.executables import ExecutableStore, Report, Variant, compile_all
from jaxserve.device.runner import PACKED, JaxRunner
from jaxserve.engine.plan import PrefillRow, Start
from jaxserve.engine.types import SamplingParams

log = logging.getLogger(__name__)


def variants(runner: JaxRunner) -> dict[tuple, Variant]:
    """Every step variant a request can reach, by its key in the runner's table of executables."""

    def every_call():
        table = runner.empty_table()
        for T in runner.prefill_buckets:
            for start in sorted({w - T for w in runner.windows if w >= T}):
                runner.prefill([PrefillRow(0, [0] * T, start, [0] * T)], table)
        for P, T in PACKED:
            if T < runner.cache_len:
                row = PrefillRow(0, [0] * T, 0, [0] * T)
                runner._prefill((P, T), runner.window_for(T - 1), [row], table, False)
        greedy = SamplingParams(temperature=1.0, top_p=0.5)
        logits = jax.ShapeDtypeStruct((runner.vocab_size,), jnp.float32, sharding=runner.spec.replicated)
        runner.insert(Start(0, greedy, 0, 1, True, logits_row=0), logits)
        runner.resume(Start(0, greedy, 0, 1, True, generated=(0,)))
        runner.copy_page(0, 0)
        for rows in runner.row_buckets:
            words = np.full(((runner.vocab_size + 31) // 32,), -1, np.int32)
            runner.set_masks([runner.slots] * rows, [words] * rows)
        for w in runner.windows:
            for rows in runner.row_buckets:
                runner.forward(table, w - 1, rows - 1)
        for rows in runner.row_buckets:
            shape = jax.ShapeDtypeStruct((rows, runner.vocab_size), jnp.float32, sharding=runner.spec.replicated)
            runner.sample(shape)
        runner.release(0)

    return runner.record(every_call)


def essential(runner: JaxRunner, key: tuple) -> bool:
    """A variant every call can fall back to (the widest prefill chunk and step with its sampling half, the
    most mask rows, the steps of one shape), or the one-row decode step at the narrowest window and its
    sampling half (a lone short request decodes at full speed from the start: the widest step costs it
    tens of times more)."""
    name, statics, shape = key
    widest = ("window", runner.windows[-1])
    if name == steps.prefill.__name__:
        return shape == (1, runner.chunk) and statics == (widest,)
    if name == steps.forward.__name__:
        return statics in ((widest, ("rows", runner.slots)), (("window", runner.windows[0]), ("rows", 1)))
    if name == steps.sample_step.__name__:  # forward's rows pick it: only the rows of the two decode steps above
        return shape[0] in (1, runner.slots)
    return name != steps.set_masks.__name__ or shape == (runner.slots,)


def urgency(key: tuple) -> tuple:
    """Background compile order: the sampling halves first (a decode step waits for its rows' one), then
    narrow windows first, then fewer rows or tokens (the shapes of short, lightly loaded requests, the
    first a fresh server sees)."""
    name, statics, shape = key
    window = 0 if name == steps.sample_step.__name__ else dict(statics).get("window", 1 << 30)
    return window, dict(statics).get("rows", int(np.prod(shape)))


def warm(
    runner: JaxRunner, store: ExecutableStore | None = None, threads: int | None = None, background=False
) -> Report:
    """Make every shape a request can reach ready: loaded from `store` where it holds a valid executable,
    else compiled in `threads` threads (and saved there). With `background`, only the essential variants
    are loaded or compiled before this returns; the rest in a thread (`runner.background`) while requests
    are served by the narrowest ready shape that covers them. Returns how many were loaded and compiled
    here, and the seconds."""
    t0 = time.perf_counter()
    found = variants(runner)
    keys = {v: key for key, v in found.items()}
    ready = lambda v, compiled: runner.ready(keys[v], compiled)
    now = [v for key, v in found.items() if not background or essential(runner, key)]
    later = [found[k] for k in sorted(found, key=urgency) if background and not essential(runner, k)]
    runner.defer({keys[v] for v in later})
    report = compile_all(runner.spec, now, store, ready, threads)
    report.seconds = time.perf_counter() - t0
    log.info(
        "%d step variants: %d loaded from %s, %d compiled%s in %.1f s%s (vocab %d, %d slots, windows %s, "
        "prefill buckets %s)",
        len(found),
        report.loaded,
        store.folder if store is not None else "no store",
        report.compiled,
        f" ({report.cache_hits} from jax's cache, not stored)" if report.cache_hits else "",
        report.seconds,
        f"; {len(later)} more loading or compiling while serving" if later else "",
        runner.vocab_size,
        runner.slots,
        runner.windows,
        runner.prefill_buckets,
    )
    if later:
        runner.background = threading.Thread(
            target=_compile_later, args=(runner, later, store, ready, threads), name="jaxserve-compile", daemon=True
        )
        runner.background.start()
    return report


def _compile_later(runner: JaxRunner, later: list[Variant], store, ready, threads) -> None:
    try:
        report = compile_all(runner.spec, later, store, ready, threads, stop=runner.stop)
        log.info(
            "other step variants ready while serving: %d loaded, %d compiled%s, in %.1f s%s",
            report.loaded,
            report.compiled,
            f" ({report.cache_hits} from jax's cache, not stored)" if report.cache_hits else "",
            report.seconds,
            f" ({len(report.missing)} left: stopped)" if report.missing else "",
        )
    except Exception:
        log.exception("compiling the other step variants failed; the ready ones serve every request")


def stop_compiling(runner: JaxRunner, timeout: float = 60) -> None:
    """Lower no more variants in the background; wait for the compiles in flight (at most one a thread)."""
    runner.stop.set()
    if runner.background is not None:
        runner.background.join(timeout)
