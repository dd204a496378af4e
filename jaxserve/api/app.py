"""Starlette routes: transport only. Bodies are parsed and checked here (size, JSON, API key), requests
validated by `protocol`, and run by `serving`; every error leaves in OpenAI's envelope.

The app answers while the model loads: /health is 503 and completions say the server is loading until
`ServerState.serving` is set. Three probes: /live (the process answers and its engine has not failed: 200
while loading), /ready (model loaded, engine running, not draining on shutdown), and /health, kept as it
was (vLLM's: 200 once the engine runs, 503 while loading or after a failure; it stays 200 while draining).

Bodies are read under a deadline (`body_timeout`, a 408 after it); a body over `max_body_bytes` is read and
discarded (up to DRAIN_BYTES, within the same deadline) before the 413, so that a client still sending can
read the answer, as nginx's lingering close does. A client that hangs up mid-upload is no server error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from jaxserve.api.chat import ChatCompletionRequest, ChatServing, parse_chat_request
from jaxserve.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jaxserve.api.metrics import Metrics
from jaxserve.api.openapi import openapi_spec
from jaxserve.api.protocol import APIError, CompletionRequest, check_unicode, parse_completion_request
from jaxserve.api.serving import CompletionServing

log = logging.getLogger(__name__)

DRAIN_BYTES = 64 * 1024 * 1024  # read and dropped at most, to answer an oversized body with a 413 the client reads
CLIENT_TIMEOUT_HEADER = "x-stainless-read-timeout"  # the openai clients' read timeout, sent with each request


@dataclasses.dataclass
class ServerState:
    metrics: Metrics
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    serving: CompletionServing | None = None  # set once the model is loaded and compiled
    load_error: str | None = None
    body_timeout: float = 30.0  # seconds to receive a whole request body
    request_timeout: float | None = None  # seconds a completion may take, queued and running; None: no bound
    lora_loading: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter are routed
    draining: bool = False  # set on SIGINT/SIGTERM: in-flight requests finish, /ready turns 503


def _json(obj, status: int = 200, headers: dict | None = None) -> Response:
    # allow_nan=False: a NaN or infinity reaching JSON is a bug to surface, never invalid JSON to send
    return Response(
        json.dumps(obj, allow_nan=False), status_code=status, headers=headers, media_type="application/json"
    )


def _error(e: APIError) -> Response:
    return _json(e.body(), e.status, e.headers)


def create_app(state: ServerState) -> Starlette:
    def serving() -> CompletionServing:
        if state.serving is None:
            raise APIError(
                503, state.load_error or "the model is still loading", type="server_error", headers={"Retry-After": "5"}
            )
        return state.serving

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise APIError(
                401,
                "Incorrect API key provided" if token else "Missing API key: send 'Authorization: Bearer KEY'",
                param=None,
                code="invalid_api_key",
            )

    async def body_json(request: Request):
        limit = state.max_body_bytes
        too_large = APIError(413, f"the request body exceeds {limit} bytes", headers={"Connection": "close"})
        length = request.headers.get("content-length", "")
        raw = bytearray()
        try:
            async with asyncio.timeout(state.body_timeout):
                if length.isdigit() and int(length) > limit:
                    await _discard(request, DRAIN_BYTES)
                    raise too_large
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > limit:
                        await _discard(request, DRAIN_BYTES - len(raw))
                        raise too_large
        except TimeoutError:
            if length.isdigit() and int(length) > limit or len(raw) > limit:
                raise too_large from None
            late = f"the request body was not received within {state.body_timeout:g} s"
            raise APIError(408, late, headers={"Connection": "close"}) from None
        try:
            return json.loads(raw)
        except RecursionError:
            raise APIError(400, "the request body is JSON nested too deeply") from None
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None

    def deadline(request: Request, req: CompletionRequest | ChatCompletionRequest) -> float | None:
        """Seconds the completion may take: --request-timeout, or less if an openai client said it will stop
        waiting sooner (its read timeout bounds a whole non-streamed answer; a stream reads as it goes)."""
        bounds = [state.request_timeout] if state.request_timeout else []
        given = request.headers.get(CLIENT_TIMEOUT_HEADER, "")
        with contextlib.suppress(ValueError):
            if not req.stream and math.isfinite(float(given)) and float(given) > 0:
                bounds.append(float(given))
        return min(bounds) if bounds else None

    def endpoint(handler, auth: bool = True):
        """Wrap a handler: API key, APIError -> envelope, anything else -> 500 without a stack trace."""

        async def wrapped(request: Request) -> Response:
            try:
                if auth:
                    check_key(request)
                response = await handler(request)
            except APIError as e:
                response = _error(e)
            except ClientDisconnect:  # hung up before its body was in: nobody to answer, nothing went wrong
                log.info("client went away during the upload on %s", request.url.path)
                response = Response(status_code=499)
            except Exception:
                log.exception("internal error on %s", request.url.path)
                response = _error(APIError(500, "internal server error", type="server_error"))
            state.metrics.count_request(response.status_code)
            return response

        return wrapped

    async def completions(request: Request) -> Response:
        req = parse_completion_request(await body_json(request))
        return await _respond(request, serving(), req, deadline(request, req))

    async def chat_completions(request: Request) -> Response:
        req = parse_chat_request(await body_json(request))
        return await _respond(request, ChatServing(serving()), req, deadline(request, req))

    async def models(request: Request) -> Response:
        srv = serving()
        return _json({"object": "list", "data": [_model_card(m, srv) for m in srv.served_ids()]})

    async def model(request: Request) -> Response:
        srv = serving()
        model_id = request.path_params["model_id"]
        if model_id not in srv.served_ids():
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return _json(_model_card(model_id, srv))

    def lora_field(body, name: str) -> str:
        value = body.get(name) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise APIError(400, f"'{name}' must be a non-empty string", param=name)
        return value

    async def load_lora_adapter(request: Request) -> Response:
        body = await body_json(request)
        name, path = lora_field(body, "lora_name"), lora_field(body, "lora_path")
        await serving().load_adapter(name, path)
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    async def unload_lora_adapter(request: Request) -> Response:
        name = lora_field(await body_json(request), "lora_name")
        serving().unload_adapter(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    async def health(request: Request) -> Response:
        ok = state.serving is not None and state.serving.scheduler.stats().healthy
        return _json(
            {"status": "ok" if ok else ("error" if state.load_error or state.serving else "loading")},
            200 if ok else 503,
        )

    async def live(request: Request) -> Response:
        failed = state.serving is not None and not state.serving.scheduler.stats().healthy
        return _json({"status": "error" if failed else "ok"}, 503 if failed else 200)

    async def ready(request: Request) -> Response:
        if state.draining:
            status = "draining"
        elif state.serving is None:
            status = "error" if state.load_error else "loading"
        else:
            status = "ready" if state.serving.scheduler.stats().healthy else "error"
        return _json({"status": status}, 200 if status == "ready" else 503)

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    def check_model(body) -> None:
        """/tokenize and /detokenize: `model` is optional, but if given it must be a served id."""
        if isinstance(body, dict) and "model" in body:
            if not isinstance(body["model"], str):
                raise APIError(400, "'model' must be a string", param="model")
            if body["model"] not in serving().served_ids():
                raise APIError(
                    404, f"The model '{body['model']}' does not exist", param="model", code="model_not_found"
                )

    async def tokenize(request: Request) -> Response:
        body, tok = await body_json(request), serving().tokenizer
        check_model(body)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise APIError(400, "'prompt' must be a string", param="prompt")
        try:
            check_unicode(body["prompt"])
        except ValueError as e:
            raise APIError(400, f"invalid value for 'prompt': {e}", param="prompt") from None
        tokens = tok.encode(body["prompt"])
        return _json({"tokens": tokens, "count": len(tokens), "max_model_len": serving().scheduler.max_context})

    async def detokenize(request: Request) -> Response:
        body, tok = await body_json(request), serving().tokenizer
        check_model(body)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < tok.vocab_size for t in tokens):
            raise APIError(400, "'tokens' must be a list of token ids", param="tokens")
        return _json({"prompt": tok.decode(tokens)})

    async def tokenizer_info(request: Request) -> Response:
        tok = serving().tokenizer

        def text(token_id):
            return None if token_id is None else tok.decode([token_id])

        return _json(
            {
                "eos_token": text(tok.eos_id),
                "bos_token": text(tok.bos_id),
                "pad_token": text(tok.eos_id),
                "add_bos_token": tok.add_bos,
                "vocab_size": tok.vocab_size,
                "model_max_length": serving().scheduler.max_context,
            }
        )

    async def openapi(request: Request) -> Response:
        return _json(openapi_spec(state.serving.served_ids() if state.serving else None, state.api_key is not None))

    routes = [
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoint(model), methods=["GET"]),
        Route("/health", endpoint(health, auth=False), methods=["GET"]),
        Route("/live", endpoint(live, auth=False), methods=["GET"]),
        Route("/ready", endpoint(ready, auth=False), methods=["GET"]),
        Route("/metrics", endpoint(metrics, auth=False), methods=["GET"]),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
        Route("/tokenizer_info", endpoint(tokenizer_info), methods=["GET"]),
        Route("/openapi.json", endpoint(openapi, auth=False), methods=["GET"]),
    ]
    if state.lora_loading:  # vLLM's run-time adapter endpoints, only when the server was started to allow them
        routes += [
            Route("/v1/load_lora_adapter", endpoint(load_lora_adapter), methods=["POST"]),
            Route("/v1/unload_lora_adapter", endpoint(unload_lora_adapter), methods=["POST"]),
        ]

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own 404 (no such route) and 405 (wrong method), in OpenAI's envelope."""
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.url.path!r}", 405: f"{request.method} is not allowed on this route"}
        response = _error(
            APIError(
                exc.status_code,
                message.get(exc.status_code, exc.detail),
                code="not_found" if exc.status_code == 404 else None,
                headers=dict(exc.headers or {}),
            )
        )
        state.metrics.count_request(response.status_code)
        return response

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


async def _discard(request: Request, limit: int) -> None:
    """Read and drop up to `limit` more bytes of the body (until it ends, or the client hangs up). Reads the
    ASGI messages itself: it may be called while `request.stream()` is being iterated."""
    while limit > 0:
        message = await request.receive()
        if message["type"] != "http.request":
            return
        limit -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _respond(request: Request, srv: CompletionServing | ChatServing, req, timeout: float | None) -> Response:
    """A completion or chat response: the whole object (abandoned if the client hangs up first) or an event
    stream; the engine aborts it `timeout` seconds from now."""
    if not req.stream:
        task = asyncio.ensure_future(srv.complete(req, timeout))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not task.done():  # the client went away: cancelling aborts its requests in the engine
            task.cancel()
            return Response(status_code=499)
        return _json(task.result())
    chunks = srv.stream(req, timeout)
    try:  # errors found before the first chunk (busy, bad prompt) are plain HTTP errors
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    return StreamingResponse(
        _sse(first, chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read: the server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(first, chunks):
    """`data: {chunk}` events, then `data: [DONE]`; a failure mid-stream becomes an error event first."""
    try:
        if first is not None:
            yield f"data: {json.dumps(first, allow_nan=False)}\n\n"
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, allow_nan=False)}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    except Exception as e:
        log.exception("error while streaming")
        yield f"data: {json.dumps(APIError(500, str(e) or 'internal server error', type='server_error').body())}\n\n"
    finally:  # also when the client went away: closing the chunks aborts the request in the engine
        await chunks.aclose()
    yield "data: [DONE]\n\n"


def _model_card(model_id: str, srv: CompletionServing) -> dict:
    card = {
        "id": model_id,
        "object": "model",
        "created": srv.created,
        "owned_by": "jaxserve",
        "max_model_len": srv.scheduler.max_context,
    }
    adapter = next((e for e in srv.scheduler.adapters.entries() if e.name == model_id), None)
    if adapter is not None:  # as vLLM lists a LoRA adapter: its files as `root`, the base model as `parent`
        card.update(root=adapter.path, parent=srv.model_ids[0])
    return card
