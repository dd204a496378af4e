"""Serving: a validated request -> engine requests (a completion's prompts here, a chat's rendered messages
from `chat`) -> an OpenAI `text_completion` object or a stream of chunks. Knows the tokenizer (for prompts,
token strings and offsets) and the engine's host types and asyncio bridge; knows nothing of HTTP, and loads
no jax.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from jaxserve.api.metrics import Metrics, RequestRecord
from jaxserve.api.protocol import APIError, CompletionRequest, SamplingRequest
from jaxserve.engine import bridge
from jaxserve.engine.grammar import compile_response_format
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.text import fill_in_the_middle
from jaxserve.engine.types import (
    DeadlineExceeded,
    Delta,
    EngineRequest,
    EngineStopped,
    QueueFull,
    RequestError,
    Usage,
)
from jaxserve.tokenizer import Tokenizer

MIN_LOGPROB = -9999.0  # what -inf is sent as: JSON has no infinities


# RequestError codes that are not a 400: a model (or adapter) that is not served, an adapter table in a
# state that refuses the change
STATUS = {"model_not_found": 404, "adapter_not_found": 404, "adapter_in_use": 409, "adapter_table_full": 409}


def engine_error(e: Exception) -> APIError:
    """The client's view of an error the engine raised for a request."""
    if isinstance(e, RequestError):
        return APIError(STATUS.get(e.code or "", 400), str(e), param=e.param, code=e.code)
    if isinstance(e, QueueFull):
        return APIError(
            429,
            f"The server is busy: {e}. Retry shortly.",
            type="server_busy_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    if isinstance(e, DeadlineExceeded):
        if e.queued:  # the server was too busy to start it in time: worth retrying later
            return APIError(
                503, f"{e}; retry later", type="server_error", code="request_timeout", headers={"Retry-After": "5"}
            )
        return APIError(504, f"{e}, so it was stopped", type="server_error", code="request_timeout")
    if isinstance(e, EngineStopped):
        return APIError(503, f"The engine is not running: {e}", type="server_error", headers={"Retry-After": "5"})
    raise TypeError(f"not an engine request error: {e!r}")


class Tally:
    """Usage, timings and finish reasons over one request's merged engine items, for the response and
    the metrics."""

    def __init__(self, choices: int):
        self.started = time.perf_counter()
        self.choices = choices
        self.first: float | None = None
        self.last: dict[int, float] = {}  # choice index -> when its latest generated token came
        self.inter_token: list[float] = []
        self.queue: list[float] = []
        self.reasons: dict[int, str] = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.rejected = False  # refused before the engine took it (busy, stopped, invalid): not a request run

    def delta(self, item: Delta | Usage) -> Delta | None:
        """Count a Usage (returns None) or note a Delta's arrival (returns it)."""
        if isinstance(item, Usage):
            self.prompt_tokens += item.prompt_tokens
            self.completion_tokens += item.completion_tokens
            if item.queue_seconds is not None:
                self.queue.append(item.queue_seconds)
            return None
        now = time.perf_counter()
        if item.tokens and not item.echo:
            if self.first is None:
                self.first = now - self.started
            if (last := self.last.get(item.index)) is not None:  # the interval shared by the tokens it brought
                self.inter_token += [(now - last) / len(item.tokens)] * len(item.tokens)
            self.last[item.index] = now
        if item.finish_reason:
            self.reasons[item.index] = item.finish_reason
        return item

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def record(self, metrics: Metrics) -> None:
        """Observe the request, finished or not: a choice without a finish reason (deadline, client gone,
        engine failure) counts as aborted."""
        if self.rejected:
            return
        metrics.observe(
            RequestRecord(
                ttft=self.first,
                e2e=time.perf_counter() - self.started,
                inter_token=self.inter_token,
                queue=self.queue,
                prompt_tokens=self.prompt_tokens,
                generation_tokens=self.completion_tokens,
                finish_reasons=[self.reasons.get(i, "abort") for i in range(self.choices)],
            )
        )


class CompletionServing:
    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        model_ids: list[str],
        metrics: Metrics,
        fingerprint: str,
        created: int | None = None,
        tool_parser: str | None = None,
    ):
        self.scheduler, self.tokenizer, self.model_ids = scheduler, tokenizer, model_ids
        self.metrics, self.fingerprint = metrics, fingerprint
        self.tool_parser = tool_parser  # chat's tool-call format; None: the one the chat template teaches
        self.created = created or int(time.time())
        metrics.attach(model_ids[0], scheduler)

    # ---- request -> engine requests ----------------------------------------------------------------

    def check_model(self, model: str) -> None:
        """A 404 naming `model` unless this server serves it (the base, an alias, or a LoRA adapter)."""
        self.adapter_of(model)

    def engine_requests(
        self, req: CompletionRequest, request_id: str, timeout: float | None = None
    ) -> list[EngineRequest]:
        """One engine request per prompt (see `requests_for`); its text encoded here, the suffix filled in."""
        self.check_model(req.model)
        vocab = self.tokenizer.vocab_size
        prompts = []
        for i, prompt in enumerate(req.prompts):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(
                    400, f"prompt {i} holds token ids outside this model's vocabulary (0..{vocab - 1})", param="prompt"
                )
            try:
                if req.suffix is not None:
                    ids = fill_in_the_middle(self.tokenizer, ids, self.tokenizer.encode(req.suffix))
            except RequestError as e:
                raise engine_error(e) from None
            prompts.append(ids)
        return self.requests_for(req, prompts, request_id, timeout)

    def requests_for(
        self, req: SamplingRequest, prompts: list[list[int]], request_id: str, timeout: float | None
    ) -> list[EngineRequest]:
        """The engine's requests for a completion's or a chat's prompts, each aborted by the engine `timeout`
        seconds from now. Checks what needs this model (its vocabulary, response_format's grammar); the engine
        checks the rest when they are submitted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            grammar = compile_response_format(req.response_format, self.tokenizer)
        except RequestError as e:
            raise engine_error(e) from None
        vocab, context, adapter = self.tokenizer.vocab_size, self.scheduler.max_context, self.adapter_of(req.model)
        return [
            dataclasses.replace(
                req.to_engine_request(f"{request_id}-{i}", ids, vocab, context, grammar, deadline), adapter=adapter
            )
            for i, ids in enumerate(prompts)
        ]

    # ---- models and LoRA adapters ---------------------------------------------------------------------

    def served_ids(self) -> list[str]:
        """Every id a request's `model` may name: the base's, then each LoRA adapter's."""
        return self.model_ids + self.scheduler.adapters.names()

    def adapter_of(self, model: str) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model); a 404 naming `model` if neither."""
        if model in self.model_ids:
            return None
        if model in self.scheduler.adapters.names():
            return model
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves {', '.join(self.served_ids())}",
            param="model",
            code="model_not_found",
        )

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve the PEFT adapter in directory `path` as model `name` (its files read in a worker thread)."""
        if name in self.model_ids:
            raise APIError(400, f"'{name}' is the base model's id", param="lora_name")
        try:
            await asyncio.to_thread(self.scheduler.load_adapter, name, path)
        except RequestError as e:
            raise engine_error(e) from None

    def unload_adapter(self, name: str) -> None:
        try:
            self.scheduler.unload_adapter(name)
        except RequestError as e:
            raise engine_error(e) from None

    # ---- running ------------------------------------------------------------------------------------

    async def results(self, reqs: list[EngineRequest], n: int, tally: Tally) -> AsyncIterator[tuple[int, Delta]]:
        """Every prompt's deltas as they come, each index made choice index = prompt index * n + j; usage,
        timings and finish reasons go to `tally`, which observes the request in the metrics when it ends."""
        try:  # closing this (the client gone, or an error) closes the bridge, which aborts every prompt's request
            async with contextlib.aclosing(bridge.generate(self.scheduler, reqs)) as results:
                async for i, item in results:
                    if isinstance(item, Delta):
                        item = Delta(i * n + item.index, item.text, item.tokens, item.finish_reason, item.echo)
                    if (delta := tally.delta(item)) is not None:
                        yield i, delta
        except (RequestError, QueueFull, EngineStopped) as e:
            tally.rejected = True
            raise engine_error(e) from None
        except DeadlineExceeded as e:
            self.metrics.count_timeout()
            raise engine_error(e) from None
        finally:
            tally.record(self.metrics)

    def _base(self, request_id: str, model: str) -> dict:
        return {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.fingerprint,
        }

    async def complete(self, req: CompletionRequest, timeout: float | None = None) -> dict:
        request_id = f"cmpl-{uuid.uuid4().hex}"
        reqs = self.engine_requests(req, request_id, timeout)
        tally = Tally(len(reqs) * req.n)
        texts: dict[int, list[str]] = {}
        infos: dict[int, list] = {}
        async with contextlib.aclosing(self.results(reqs, req.n, tally)) as results:
            async for _, item in results:
                texts.setdefault(item.index, []).append(item.text)
                infos.setdefault(item.index, []).extend(item.tokens)
        reasons = tally.reasons
        choices = []
        for index in sorted(texts):
            text = "".join(texts[index])
            logprobs = None
            if req.logprobs is not None:
                prompt_len = 0 if req.echo else len(self._prompt_text(reqs[index // req.n]))
                logprobs = self._logprobs(infos[index], req.logprobs, prompt_len)
            choices.append({"text": text, "index": index, "logprobs": logprobs, "finish_reason": reasons.get(index)})
        return {**self._base(request_id, req.model), "choices": choices, "usage": tally.usage()}

    async def stream(self, req: CompletionRequest, timeout: float | None = None) -> AsyncIterator[dict]:
        """Chunks in OpenAI's streaming shape; the last chunk of each choice carries its finish_reason, and
        with stream_options.include_usage a final chunk with `choices: []` carries the usage."""
        request_id = f"cmpl-{uuid.uuid4().hex}"
        reqs = self.engine_requests(req, request_id, timeout)
        base = self._base(request_id, req.model)
        offsets: dict[int, int] = {}
        tally = Tally(len(reqs) * req.n)
        async with contextlib.aclosing(self.results(reqs, req.n, tally)) as results:
            async for i, item in results:
                logprobs = None
                if req.logprobs is not None:
                    if item.index not in offsets:
                        offsets[item.index] = 0 if req.echo else len(self._prompt_text(reqs[i]))
                    logprobs = self._logprobs(item.tokens, req.logprobs, offsets[item.index])
                    offsets[item.index] += sum(len(s) for s in logprobs["tokens"])
                yield {
                    **base,
                    "choices": [
                        {
                            "text": item.text,
                            "index": item.index,
                            "logprobs": logprobs,
                            "finish_reason": item.finish_reason,
                        }
                    ],
                }
        if req.stream_options and req.stream_options.include_usage:
            yield {**base, "choices": [], "usage": tally.usage()}

    # ---- logprobs -----------------------------------------------------------------------------------

    def _prompt_text(self, r: EngineRequest) -> str:
        return self.tokenizer.decode(r.prompt_ids)

    def token_text(self, token_id: int) -> str:
        """A token's text; a token that is not whole UTF-8 on its own is written as OpenAI does: 'bytes:\\xNN'."""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _logprobs(self, infos, k: int, offset: int) -> dict:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for info in infos:
            text = self.token_text(info.token_id)
            tokens.append(text)
            text_offset.append(offset)
            offset += len(text)
            if info.logprob is None:  # the first prompt token has no context to be predicted from
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(max(info.logprob, MIN_LOGPROB))
            # OpenAI: "always the logprob of the sampled token, so there may be up to logprobs+1 elements"
            entries = list(info.top[:k])
            if all(token_id != info.token_id for token_id, _ in entries):
                entries.append((info.token_id, info.logprob))
            top: dict[str, float] = {}
            for token_id, lp in entries:
                key = self.token_text(token_id)
                # two tokens with the same text: keep both, the one not sampled told apart by its id (the
                # sampled token's key is always its text, as in `tokens`)
                if token_id != info.token_id and (key in top or key == text):
                    key = f"{key} [token {token_id}]"
                top[key] = max(lp, MIN_LOGPROB)
            top_logprobs.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }
