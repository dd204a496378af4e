"""What the engine takes and gives, as plain host types: no jax here, so the HTTP layer can speak to the
engine without loading it.

A request's defaults are stated once, here (the API layer passes only what a client set); an error a
request causes carries the parameter to blame, so nothing upstream has to guess it from the message.
"""

from __future__ import annotations

import dataclasses

TOP_LOGPROBS = 20  # the most likely tokens each step reports, with logprobs: what chat's top_logprobs allows


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling knobs (validated at the boundary). Each becomes a per-slot row on device."""

    temperature: float = 1.0  # 0: exact argmax
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    seed: int = 0  # the sequence's key stream; the engine sets it per choice from EngineRequest.seed


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int = 16
    sampling: SamplingParams = SamplingParams()  # its seed is ignored: see `seed`
    seed: int | None = None  # None: a fresh random stream per choice
    n: int = 1
    best_of: int | None = None  # candidates generated; the n with the highest mean token logprob are returned
    echo: bool = False
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    deadline: float | None = None  # time.monotonic() after which the engine aborts it (DeadlineExceeded)
    grammar: str | None = None  # an llguidance grammar (`grammar.compile_response_format`) every choice follows
    adapter: str | None = None  # the LoRA adapter (by name) it is computed with; None: the base model

    @property
    def candidates(self) -> int:
        """Sequences generated: best_of if given, else n."""
        return max(self.n, self.best_of or self.n)


@dataclasses.dataclass
class TokenInfo:
    token_id: int
    logprob: float | None  # None for the first prompt token
    top: list[tuple[int, float]]  # the model's most likely tokens there, best first


@dataclasses.dataclass
class Delta:
    index: int  # choice index, 0..n-1
    text: str
    tokens: list[TokenInfo]  # the tokens behind `text`, each with its logprob and the top TOP_LOGPROBS
    finish_reason: str | None = None  # "stop" | "length" on a choice's last delta
    echo: bool = False  # the prompt itself (echo), sent before any generated text


@dataclasses.dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float | None = None  # from submission to admission into slots


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """One snapshot of the engine (`Scheduler.stats()`): all that metrics and probes read of it."""

    healthy: bool  # the scheduler loop runs (False while starting, after a failure, once shut down)
    queue_depth: int  # prompts waiting for slots
    active_slots: int  # slots holding a sequence
    steps: int  # scheduler loops run
    preemptions: int  # sequences preempted for KV pages
    kv_pages: int  # pages in the pool
    kv_pages_held: int  # held by sequences
    kv_pages_cached: int  # holding a cached prefix
    kv_evictions: int  # cached pages evicted
    prefix_queried_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int  # of those, found cached
    # the device side's, where it has them (the tests' fake core compiles nothing and has no model)
    compiles: int | None = None  # jitted steps compiled
    variants_pending: int | None = None  # step shapes a background warm-up is still compiling
    formulation: str | None = None  # how the weight matmuls compute (quant.Formulation.describe)
    kernel_below_rows: int | None = None
    bf16_from_rows: int | None = None
    max_loras: int = 0  # LoRA adapters resident at once (0: none served)
    running_adapters: tuple[str, ...] = ()  # the LoRA adapters of admitted requests
    waiting_adapters: tuple[str, ...] = ()  # of waiting ones


class RequestError(ValueError):
    """A request the engine cannot run as asked; `param` names the request field to blame."""

    code: str | None = None

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class ContextLengthError(RequestError):
    code = "context_length_exceeded"


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


class DeadlineExceeded(Exception):
    """The request's deadline passed: while it still waited (`queued`), or while it ran."""

    def __init__(self, message: str, queued: bool):
        super().__init__(message)
        self.queued = queued


class EngineStopped(RuntimeError):
    """The engine is not running (shut down or failed): the request cannot finish."""
