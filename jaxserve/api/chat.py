"""The Chat Completions API: its request model and its serving, over the completions' serving.

A chat request is validated here (every bad field named, down to `messages[i].content[j].type`; the
fields it shares with completions by `protocol`, the same way), its messages rendered by the model's own
chat template (`jaxserve.chat_template`), and the rendered prompt run as a completion's prompts are, on
the same engine: so a chat at temperature 0 gives exactly the tokens of a completion of
that rendered text. The answers leave as `chat.completion` objects or `chat.completion.chunk` streams
(the role first, then content, a finish_reason per choice, the usage chunk if asked).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field, model_validator

from jaxserve.api.protocol import APIError, SamplingRequest, check_unicode, parse_request
from jaxserve.api.serving import MIN_LOGPROB, CompletionServing, Tally
from jaxserve.chat_template import TemplateError, encode_prompt, render
from jaxserve.engine.types import TOP_LOGPROBS, EngineRequest, TokenInfo

ROLES = ("system", "developer", "user", "assistant")


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        self.messages = [_message(i, m) for i, m in enumerate(self.messages)]
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _own_params(self, prompt_tokens: int, max_context: int) -> dict[str, Any]:
        # OpenAI's default: as much as the context leaves
        return {"max_tokens": self.limit if self.limit is not None else max(1, max_context - prompt_tokens)}


def _message(i: int, m: Any) -> dict[str, str]:
    """One message -> {"role", "content"} for the template: text parts joined, `developer` as `system`."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
    role = m.get("role")
    if role not in ROLES:
        raise APIError(
            400, f"{where}.role must be one of {', '.join(ROLES)} (received {role!r})", param=f"{where}.role"
        )
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported "
                    f"(received type {kind!r})",
                    param=f"{where}.content[{j}].type",
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    _check_text(content, f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _check_text(text: str, param: str) -> None:
    try:
        check_unicode(text)
    except ValueError as e:
        raise APIError(400, f"invalid value for '{param}': {e}", param=param) from None


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, body)


class ChatServing:
    """Chat on top of a CompletionServing (its engine, tokenizer, metrics and model names)."""

    def __init__(self, completions: CompletionServing):
        self.completions = completions
        self.tokenizer = completions.tokenizer

    def prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        try:
            text = render(self.tokenizer, req.messages, add_generation_prompt=True)
        except TemplateError as e:
            missing = not self.tokenizer.chat_template
            message = (
                "this model has no chat template, so it cannot serve chat completions; use /v1/completions"
                if missing
                else str(e)
            )
            raise APIError(400, message, param="messages", code="chat_template_missing" if missing else None) from None
        return encode_prompt(self.tokenizer, text)

    def engine_requests(
        self, req: ChatCompletionRequest, request_id: str, timeout: float | None = None
    ) -> list[EngineRequest]:
        """The rendered messages as one prompt, run as the completions' engine requests are."""
        self.completions.check_model(req.model)
        return self.completions.requests_for(req, [self.prompt_ids(req)], request_id, timeout)

    def _base(self, request_id: str, model: str, kind: str) -> dict:
        return {
            "id": request_id,
            "object": kind,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.completions.fingerprint,
        }

    async def complete(self, req: ChatCompletionRequest, timeout: float | None = None) -> dict:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        reqs = self.engine_requests(req, request_id, timeout)
        tally = Tally(req.n)
        texts: dict[int, list[str]] = {i: [] for i in range(req.n)}
        infos: dict[int, list[TokenInfo]] = {i: [] for i in range(req.n)}
        async with contextlib.aclosing(self.completions.results(reqs, req.n, tally)) as results:
            async for _, item in results:
                texts[item.index].append(item.text)
                infos[item.index].extend(item.tokens)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(texts[i]), "refusal": None},
                "logprobs": self._logprobs(infos[i], req) if req.logprobs else None,
                "finish_reason": tally.reasons.get(i),
            }
            for i in range(req.n)
        ]
        return {**self._base(request_id, req.model, "chat.completion"), "choices": choices, "usage": tally.usage()}

    async def stream(self, req: ChatCompletionRequest, timeout: float | None = None) -> AsyncIterator[dict]:
        """The first chunk of each choice carries the role; then its content; its last its finish_reason
        (with an empty delta); with stream_options.include_usage a final chunk with `choices: []`."""
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        reqs = self.engine_requests(req, request_id, timeout)
        base = self._base(request_id, req.model, "chat.completion.chunk")
        usage_asked = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if usage_asked else {}
        tally = Tally(req.n)

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return {**base, "choices": [choice], **extra}

        started: set[int] = set()
        async with contextlib.aclosing(self.completions.results(reqs, req.n, tally)) as results:
            async for _, item in results:
                if item.index not in started:
                    started.add(item.index)
                    yield chunk(item.index, {"role": "assistant", "content": ""})
                if item.text or item.tokens:
                    logprobs = self._logprobs(item.tokens, req) if req.logprobs else None
                    yield chunk(item.index, {"content": item.text}, logprobs)
                if item.finish_reason:
                    yield chunk(item.index, {}, finish_reason=item.finish_reason)
        if usage_asked:
            yield {**base, "choices": [], "usage": tally.usage()}

    def _logprobs(self, infos: list[TokenInfo], req: ChatCompletionRequest) -> dict:
        k = req.top_logprobs or 0

        def entry(token_id: int, logprob: float) -> dict:
            raw = self.tokenizer.token_bytes(token_id)
            return {
                "token": raw.decode("utf-8", errors="replace"),
                "logprob": max(logprob, MIN_LOGPROB),
                "bytes": list(raw),
            }

        content = [
            {**entry(i.token_id, i.logprob or 0.0), "top_logprobs": [entry(t, lp) for t, lp in i.top[:k]]}
            for i in infos
        ]
        return {"content": content, "refusal": None}
