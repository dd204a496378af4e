"""The engine: jitted steps over the mesh (core), on-device sampling, the scheduler thread (engine) and
host-side text (detokenizing, stop strings). `build_engine` is the one way to put them together."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxserve.checkpoint import LoadedModel
from jaxserve.engine.core import EngineCore
from jaxserve.engine.engine import (ContextLengthError, Delta, Engine, EngineRequest, EngineStopped, QueueFull, TokenInfo,
                                    Usage)
from jaxserve.engine.sampling import SamplingParams

DEFAULT_SLOTS = 64  # the default model serves 64 sequences at once on a 2-core, 24 GiB machine
DEFAULT_CONTEXT = 2048  # per slot: 64 x 2048 positions of SmolLM2's KV cache take 6 GB in float32

__all__ = ["ContextLengthError", "Delta", "Engine", "EngineCore", "EngineRequest", "EngineStopped", "QueueFull", "SamplingParams",
           "TokenInfo", "Usage", "DEFAULT_CONTEXT", "DEFAULT_SLOTS", "build_engine", "enable_compilation_cache"]


def enable_compilation_cache(directory: Path) -> None:
    """Keep compiled steps in `directory` so a restart loads them instead of compiling again."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def build_engine(model: LoadedModel, slots: int = DEFAULT_SLOTS, max_context: int | None = DEFAULT_CONTEXT,
                 warmup: bool = True, max_waiting: int = 256) -> Engine:
    """An engine over `slots` sequences of up to `max_context` tokens (capped by the model's), started.
    With warmup, every shape is compiled before the first request."""
    cache_len = min(model.cfg.max_context, max_context or model.cfg.max_context)
    core = EngineCore(model, slots=slots, cache_len=cache_len, eos_id=model.tokenizer.eos_id)
    if warmup:
        core.warmup()
    return Engine(core, model.tokenizer, max_waiting=max_waiting).start()
