"""The request models (the sampling fields both APIs share, and the Completions API's own) and OpenAI's
error envelope.

Validation happens here, once, at the boundary: a bad request becomes an `APIError` naming the parameter
and the value received; everything past this module can trust its inputs. Parameters OpenAI does not
define are ignored (with a log line), as OpenAI does.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jaxserve.engine.types import EngineRequest, SamplingParams

log = logging.getLogger(__name__)

MAX_STOPS = 4
TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,10}")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses


class APIError(Exception):
    """An error for the client, in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


Prompt = str | list[str] | list[int] | list[list[int]]


def check_unicode(text: str) -> str:
    """Raise ValueError for text that is not valid Unicode (a lone surrogate such as "\\ud800", which JSON
    escapes, and Python's JSON decoder, let through): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        raise ValueError(f"the text holds a lone surrogate (U+{char:04X}) at position {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(check_unicode)]  # a string that is valid Unicode


class SamplingRequest(BaseModel):
    """The fields the Completions and Chat Completions requests share, validated one way, and the engine's
    request made from them (`to_engine_request`); each API adds its own fields and `_own_params`."""

    # strict, as OpenAI validates: "yes" is not a bool, "2" is not a number (an int is still a valid float)
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    ignore_eos: bool = False  # an extension (as in vLLM and llama.cpp): generate past EOS, for benchmarks
    response_format: dict[str, Any] | None = None  # structured outputs (for completions, an extension)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed, got {len(stops)}")
        for stop in stops:
            check_unicode(stop)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, value in (v or {}).items():
            if not TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {value} for token {key}")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling_params(self, vocab_size: int) -> SamplingParams:
        """The knobs of `SamplingParams` taken from the request fields of the same names (null: the engine's
        default), so that a new knob declared in both needs nothing here; `logit_bias` as (token id, bias)
        pairs of this vocabulary. Its `seed` is the engine's to set per choice (EngineRequest.seed)."""
        given = {name: getattr(self, name) for name in SAMPLED if name in type(self).model_fields}
        bias = []
        for key, value in (self.logit_bias or {}).items():
            if not 0 <= int(key) < vocab_size:
                raise APIError(
                    400,
                    f"logit_bias key {key} is not a token id of this model (0..{vocab_size - 1})",
                    param="logit_bias",
                )
            bias.append((int(key), float(value)))
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, logit_bias=tuple(bias))

    def to_engine_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        vocab_size: int,
        max_context: int,
        grammar: str | None = None,
        deadline: float | None = None,
    ) -> EngineRequest:
        """The engine's request for one prompt of this request (its token ids), on a model of `vocab_size`
        tokens and `max_context` positions; `grammar` compiled from response_format; `deadline` as
        time.monotonic() (None: no bound)."""
        return EngineRequest(
            request_id,
            tuple(prompt_ids),
            sampling=self.sampling_params(vocab_size),
            seed=self.seed,
            n=self.n,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
            deadline=deadline,
            grammar=grammar,
            **self._own_params(len(prompt_ids), max_context),
        )

    def _own_params(self, prompt_tokens: int, max_context: int) -> dict[str, Any]:
        """The EngineRequest fields this API sets its own way."""
        raise NotImplementedError


# SamplingParams' knobs a request sets by name (logit_bias is converted; seed is per choice)
SAMPLED = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in ("logit_bias", "seed"))

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    suffix: Text | None = None
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=128)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        for text in [v] if isinstance(v, str) else [p for p in v if isinstance(p, str)]:
            check_unicode(text)
        if isinstance(v, list) and (not v or any(isinstance(p, (str, list)) and not p for p in v)):
            raise ValueError("the prompt must not be empty")
        if isinstance(v, str) and not v:
            raise ValueError("the prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of < self.n:
            raise APIError(
                400, f"best_of ({self.best_of}) must be greater than or equal to n ({self.n})", param="best_of"
            )
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise APIError(
                400,
                "best_of cannot be used with stream: the best candidates are known only at the end",
                param="best_of",
            )
        return self

    def _own_params(self, prompt_tokens: int, max_context: int) -> dict[str, Any]:
        limit = {} if self.max_tokens is None else {"max_tokens": self.max_tokens}  # null: the engine's default
        return {"best_of": self.best_of, "echo": self.echo, **limit}

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


M = TypeVar("M", bound=BaseModel)


def parse_request(model: type[M], body: Any) -> M:
    """JSON body -> a request model (completion or chat), or an APIError naming the first bad parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except APIError:
        raise
    except ValidationError as e:
        raise _validation_error(e, body) from None
    if req.model_extra:
        log.info("ignoring unknown parameters: %s", ", ".join(sorted(req.model_extra)))
    return req


def parse_completion_request(body: Any) -> CompletionRequest:
    return parse_request(CompletionRequest, body)


def _validation_error(e: ValidationError, body: dict) -> APIError:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    param = loc[0] if loc else None
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, APIError):
        return ctx_error
    if err["type"] == "missing":
        return APIError(400, f"you must provide the '{param}' parameter", param=param)
    detail = str(ctx_error) if ctx_error else err["msg"]
    return APIError(400, f"invalid value for '{param}': {detail} (received {_shown(body.get(param))})", param=param)


def _shown(value: Any, limit: int = 200) -> str:
    """The value received, for a message: cut to `limit` characters, and safe for any JSON value (a deeply
    nested one makes repr() recurse too deep)."""
    try:
        text = repr(value)
    except RecursionError:
        return "a value nested too deeply"
    return text if len(text) <= limit else text[:limit] + "..."
