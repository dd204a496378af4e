"""`build_engine`: the one way to put a model, its device core and the scheduler together."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from jaxserve.chat_template import end_of_turn_ids
from jaxserve.device.executables import ExecutableStore
from jaxserve.device.formulation import choose
from jaxserve.device.runner import PAGE_SIZE, JaxRunner
from jaxserve.device.warmup import warm
from jaxserve.engine.scheduler import Scheduler
from jaxserve.model import KVCache, LoadedModel, ModelConfig, attention_kernels

if TYPE_CHECKING:
    from jaxserve.multihost.group import Group

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 64  # sequences decoded at once
DEFAULT_CONTEXT = 2048  # tokens per sequence (prompt and completion)
CPU_KV_MEMORY = 1 << 30  # the default pool on a CPU host: the whole process stays within a few GB
DEVICE_KV_FRACTION = 0.5  # the default pool on an accelerator: this share of its memory still free


def pool_pages(
    cfg: ModelConfig, page_size: int, slots: int, cache_len: int, memory: int | None = None, pages: int | None = None
) -> int:
    """Pages in the KV pool: `pages` if given, else as many as `memory` bytes hold (default: CPU_KV_MEMORY
    on a CPU, DEVICE_KV_FRACTION of the accelerator's free memory), never more than every slot at full
    context needs, nor fewer than one full-context sequence needs."""
    per_page = KVCache.bytes_per_token(cfg) * page_size
    if pages is None:
        if memory is None:
            memory = CPU_KV_MEMORY
            if jax.default_backend() != "cpu":
                stats = jax.devices()[0].memory_stats() or {}
                if "bytes_limit" in stats:
                    memory = int(DEVICE_KV_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
        pages = memory // per_page
    per_seq = -(-cache_len // page_size)
    return max(per_seq, min(pages, slots * per_seq))


def enable_compilation_cache(directory: Path) -> None:
    """Keep compiled steps in `directory` so a restart loads them instead of compiling again."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def build_runner(
    model: LoadedModel,
    slots: int = DEFAULT_SLOTS,
    max_context: int | None = DEFAULT_CONTEXT,
    warmup: bool = True,
    kv_cache_memory: int | None = None,
    num_pages: int | None = None,
    page_size: int = PAGE_SIZE,
    formulation: str = "auto",
    formulation_cache: Path | None = None,
    executable_cache: Path | None = None,
    background: bool = False,
    max_loras: int = 0,
    max_lora_rank: int = 16,
    kv_cache_dtype: str = "auto",
) -> JaxRunner:
    """The device runner over `slots` sequences of up to `max_context` tokens (capped by the model's),
    their KV in a pool of `num_pages` pages or of `kv_cache_memory` bytes (see `pool_pages`). The int8
    matmuls' `formulation` ("auto", "f32", "bf16") is settled first (see engine.formulation; an automatic
    choice is cached in the folder `formulation_cache`, None: measured each time). With warmup, every shape
    is then compiled before the first request, or loaded from the folder `executable_cache` where an
    earlier start saved it (None: compiled each time, through jax's compilation cache if one is set); with
    `background`, only the shapes every request can fall back to before this returns, the rest while
    requests are served (see device.warmup). A stack of `max_loras` LoRA adapters (0: none, the steps then
    compute the base alone) of rank up to `max_lora_rank` is sized once: loading one later compiles nothing.
    The pool holds `kv_cache_dtype` ("auto": the model's dtype; bfloat16 under float32 activations: twice
    the pages in the same memory, attention still in float32)."""
    choice = choose(model, slots, formulation, formulation_cache)
    log.info("%s", choice.describe(model.cfg))
    model = choice.apply(model)
    cache_len = min(model.cfg.max_context, max_context or model.cfg.max_context)
    page_size = min(page_size, cache_len)
    cfg = attention_kernels.choose(model.cfg.with_kv_dtype(kv_cache_dtype), model.mesh, page_size)
    model = dataclasses.replace(model, cfg=cfg)
    pages = pool_pages(model.cfg, page_size, slots, cache_len, kv_cache_memory, num_pages)
    tok = model.tokenizer
    # a generation ends at any EOS id and at the chat template's end of turn
    eos_ids = tok.eos_ids + end_of_turn_ids(tok)
    core = JaxRunner(
        model,
        slots=slots,
        cache_len=cache_len,
        eos_id=tok.eos_id,
        eos_ids=eos_ids,
        pages=pages,
        page_size=page_size,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
    )
    log.info(
        "KV cache: %d pages of %d tokens = %d tokens (%.2f GB, %s); %d sequences of up to %d tokens",
        core.pages,
        core.page_size,
        core.pages * core.page_size,
        core.kv_bytes / 1e9,
        cfg.cache_dtype,
        slots,
        cache_len,
    )
    if warmup:
        warm(core, None if executable_cache is None else ExecutableStore(executable_cache), background=background)
    return core


def build_engine(
    model: LoadedModel,
    max_waiting: int = 256,
    prefix_caching: bool = True,
    loras: dict[str, str] | None = None,
    max_loras: int | None = None,
    group: Group | None = None,
    **runner: Any,
) -> Scheduler:
    """A started scheduler over `build_runner(model, **runner)`, with prefix caching or not. LoRA: `loras`
    {name: PEFT directory} are served beside the base, in a stack of `max_loras` adapters (None: as many
    as `loras`). In a `group`, process 0 ships every plan to the others (see multihost)."""
    loras = loras or {}
    max_loras = len(loras) if max_loras is None else max_loras
    if len(loras) > max_loras:
        raise ValueError(f"{len(loras)} LoRA adapters given, but --max-loras is {max_loras}")
    core = build_runner(model, max_loras=max_loras, **runner)
    scheduler = Scheduler(core, model.tokenizer, max_waiting=max_waiting, prefix_caching=prefix_caching)
    log.info("prefix caching %s", "on" if prefix_caching else "off")
    if group is not None:
        from jaxserve.multihost.leader import lead

        lead(scheduler, group)  # before it starts: every plan goes to the others first
    for name, path in loras.items():
        scheduler.adapters.load(name, path, core)
    return scheduler.start()
