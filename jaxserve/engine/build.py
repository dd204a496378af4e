"""`build_engine`: the one way to put a model, its device core and the scheduler together."""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from jaxserve.chat_template import end_of_turn_ids
from jaxserve.checkpoint import LoadedModel
from jaxserve.engine.core import JaxCore
from jaxserve.engine.formulation import choose
from jaxserve.engine.scheduler import Scheduler

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 64  # sequences decoded at once
DEFAULT_CONTEXT = 2048  # tokens per slot (prompt and completion)


def enable_compilation_cache(directory: Path) -> None:
    """Keep compiled steps in `directory` so a restart loads them instead of compiling again."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def build_engine(
    model: LoadedModel,
    slots: int = DEFAULT_SLOTS,
    max_context: int | None = DEFAULT_CONTEXT,
    warmup: bool = True,
    max_waiting: int = 256,
    formulation: str = "auto",
    formulation_cache: Path | None = None,
) -> Scheduler:
    """A started scheduler over `slots` sequences of up to `max_context` tokens (capped by the model's).
    The int8 matmuls' `formulation` ("auto", "f32", "bf16") is settled first (see engine.formulation; an
    automatic choice is cached in the folder `formulation_cache`, None: measured each time). With warmup,
    every shape is then compiled before the first request."""
    choice = choose(model, slots, formulation, formulation_cache)
    log.info("%s", choice.describe(model.cfg))
    model = choice.apply(model)
    cache_len = min(model.cfg.max_context, max_context or model.cfg.max_context)
    tok = model.tokenizer
    # a generation ends at any EOS id and at the chat template's end of turn
    eos_ids = tok.eos_ids + end_of_turn_ids(tok)
    core = JaxCore(model, slots=slots, cache_len=cache_len, eos_id=tok.eos_id, eos_ids=eos_ids)
    if warmup:
        core.warmup()
    return Scheduler(core, model.tokenizer, max_waiting=max_waiting).start()
