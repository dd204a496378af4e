"""The Chat Completions API: its request model and its serving, over the completions' serving.

A chat request is validated here (every bad field named, down to `messages[i].content[j].type`; the
fields it shares with completions by `protocol`, the same way), its messages rendered by the model's own
chat template (`jaxserve.chat_template`), and the rendered prompt run as a completion's prompts are, on
the same engine: so a chat at temperature 0 gives exactly the tokens of a completion of
that rendered text. The answers leave as `chat.completion` objects or `chat.completion.chunk` streams
(the role first, then content, a finish_reason per choice, the usage chunk if asked). Tool calling
(`tools`, `tool_choice`, the tool history, calls in the answers) is `jaxserve.api.tools`'s, hooked in here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from jaxserve.api import tools
from jaxserve.api.protocol import APIError, SamplingRequest, check_unicode, parse_request
from jaxserve.api.serving import MIN_LOGPROB, CompletionServing, Tally
from jaxserve.chat_template import TemplateError, encode_prompt, render
from jaxserve.engine.types import TOP_LOGPROBS, EngineRequest, TokenInfo

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    _tool_spec: tools.ToolSpec | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        self.messages = [_message(i, m) for i, m in enumerate(self.messages)]
        tools.check_history(self.messages)
        self._tool_spec = tools.parse_spec(self.tools, self.tool_choice, self.parallel_tool_calls)
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _own_params(self, prompt_tokens: int, max_context: int) -> dict[str, Any]:
        # OpenAI's default: as much as the context leaves
        return {"max_tokens": self.limit if self.limit is not None else max(1, max_context - prompt_tokens)}


def _message(i: int, m: Any) -> dict[str, Any]:
    """One message -> {"role", "content"} for the template: text parts joined, `developer` as `system`;
    and its tool fields."""
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
    return tools.message_fields(where, m, {"role": "system" if role == "developer" else role, "content": content})


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
        messages, variables = tools.template_inputs(req.messages, req._tool_spec, self.tokenizer.chat_template)
        try:
            text = render(self.tokenizer, messages, add_generation_prompt=True, **variables)
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
    ) -> tuple[list[EngineRequest], tools.ToolPlan | None]:
        """The rendered messages as one prompt, run as the completions' engine requests are; and how their
        answers are constrained and read for tool calls (None: plain text)."""
        self.completions.check_model(req.model)
        reqs = self.completions.requests_for(req, [self.prompt_ids(req)], request_id, timeout)
        plan = tools.plan(req._tool_spec, self.tokenizer, self.completions.tool_parser)
        if plan is None:
            return reqs, None
        if any(r.grammar is not None for r in reqs):
            raise APIError(400, "response_format cannot be combined with tools", param="response_format")
        return [dataclasses.replace(r, grammar=plan.grammar) for r in reqs], plan

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
        reqs, plan = self.engine_requests(req, request_id, timeout)
        tally = Tally(req.n)
        texts: dict[int, list[str]] = {i: [] for i in range(req.n)}
        infos: dict[int, list[TokenInfo]] = {i: [] for i in range(req.n)}
        async with contextlib.aclosing(self.completions.results(reqs, req.n, tally)) as results:
            async for _, item in results:
                texts[item.index].append(item.text)
                infos[item.index].extend(item.tokens)
        choices = []
        for i in range(req.n):
            text, reason = "".join(texts[i]), tally.reasons.get(i)
            message = {"role": "assistant", "content": text, "refusal": None}
            if plan is not None:
                message, reason = tools.message(plan, text, reason)
            logprobs = self._logprobs(infos[i], req) if req.logprobs else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
        return {**self._base(request_id, req.model, "chat.completion"), "choices": choices, "usage": tally.usage()}

    async def stream(self, req: ChatCompletionRequest, timeout: float | None = None) -> AsyncIterator[dict]:
        """The first chunk of each choice carries the role; then its content; its last its finish_reason
        (with an empty delta); with stream_options.include_usage a final chunk with `choices: []`."""
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        reqs, plan = self.engine_requests(req, request_id, timeout)
        calls = {i: tools.ChoiceStream(plan) for i in range(req.n)} if plan else {}
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
                if calls:  # content as it is safe, each call when whole; logprobs ride the first delta
                    logprobs = self._logprobs(item.tokens, req) if req.logprobs and item.tokens else None
                    deltas = calls[item.index].feed(item.text) or ([{"content": ""}] if logprobs else [])
                    for k, delta in enumerate(deltas):
                        yield chunk(item.index, delta, None if k else logprobs)
                elif item.text or item.tokens:
                    logprobs = self._logprobs(item.tokens, req) if req.logprobs else None
                    yield chunk(item.index, {"content": item.text}, logprobs)
                if item.finish_reason:
                    reason = item.finish_reason
                    if calls:  # held text and calls not yet sent
                        deltas, reason = calls[item.index].finish(reason)
                        for delta in deltas:
                            yield chunk(item.index, delta)
                    yield chunk(item.index, {}, finish_reason=reason)
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
