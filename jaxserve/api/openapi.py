"""The OpenAPI 3.1 description of the served API, complete enough for client generators and fuzzers:
request bodies of every POST, the served model ids as `model`'s allowed values, the bearer scheme when an
API key is required, and response schemas for successes and OpenAI's error envelope.

The request schema comes from the pydantic model, tightened with what `protocol` checks in validators
(non-empty prompts, at most 4 stops, integer `logit_bias` keys), so that a request the schema allows is one
the server does not reject for its shape.
"""

from __future__ import annotations

import copy

from jaxserve.api.chat import ChatCompletionRequest
from jaxserve.api.protocol import MAX_STOPS, TOKEN_ID_KEY, CompletionRequest

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _json(schema: dict, description: str = "ok") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR = _json(_ref("Error"), "an error in OpenAI's envelope")
NULLABLE_STR = {"type": ["string", "null"]}

LOGPROBS = {
    "type": ["object", "null"],
    "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    "properties": {
        "tokens": {"type": "array", "items": {"type": "string"}},
        "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
        "top_logprobs": {
            "type": "array",
            "items": {"type": ["object", "null"], "additionalProperties": {"type": "number"}},
        },
        "text_offset": {"type": "array", "items": {"type": "integer"}},
    },
}
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
USAGE = {
    "type": "object",
    "required": list(USAGE_FIELDS),
    "properties": {
        k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}
COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "text_completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "system_fingerprint": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["text", "index", "logprobs", "finish_reason"],
                "properties": {
                    "text": {"type": "string"},
                    "index": {"type": "integer", "minimum": 0},
                    "logprobs": LOGPROBS,
                    "finish_reason": {"enum": ["stop", "length", None]},
                },
            },
        },
        "usage": USAGE,
    },
}
MODEL_CARD = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "max_model_len": {"type": "integer"},
    },
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": NULLABLE_STR,
                "code": NULLABLE_STR,
            },
        }
    },
}
SSE_EVENT = {  # one event of a stream: a chunk (a completion object), an error event, then `data: [DONE]`
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "if": {"const": "[DONE]"},
            "else": {
                "contentMediaType": "application/json",
                "contentSchema": {
                    "anyOf": [{"$ref": REF.format(model="Completion")}, {"$ref": REF.format(model="Error")}]
                },
            },
        }
    },
}
PROBE = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}


def _request_schema(model_ids: list[str] | None) -> tuple[dict, dict]:
    schema = CompletionRequest.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    props = schema["properties"]
    if model_ids:
        props["model"]["enum"] = list(model_ids)
    for option in props["prompt"]["anyOf"]:  # never empty: no empty string, list, or inner list
        if option["type"] == "string":
            option["minLength"] = 1
        else:
            option["minItems"] = 1
            if option["items"].get("type") == "array":
                option["items"]["minItems"] = 1
            elif option["items"].get("type") == "string":
                option["items"]["minLength"] = 1
    _tighten_shared(props)
    return schema, defs


def _tighten_shared(props: dict) -> None:
    """What `protocol` checks of the fields both request models share (SamplingRequest), in their schema."""
    for option in props["stop"]["anyOf"]:
        if option["type"] == "array":
            option["maxItems"] = MAX_STOPS
    bias = props["logit_bias"]["anyOf"][0]
    bias["propertyNames"] = {"pattern": f"^{TOKEN_ID_KEY.pattern}$"}
    bias["additionalProperties"] = {"type": "number", "minimum": -100, "maximum": 100}


def openapi_spec(model_ids: list[str] | None = None, api_key: bool = False) -> dict:
    """The spec; `model_ids` (once the model is loaded) become `model`'s enum; `api_key` adds the bearer
    scheme to every operation that needs it."""
    request_schema, defs = _request_schema(model_ids)
    secured = {"security": [{"bearerAuth": []}]} if api_key else {}
    auth_errors = {"401": ERROR} if api_key else {}
    body_errors = {code: ERROR for code in ("400", "408", "413")}
    loading = {"503": ERROR}
    completion_op = {
        "summary": "Create a completion (stream: server-sent events ending with `data: [DONE]`)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CompletionRequest")}}},
        "responses": {
            "200": {
                "description": "a text_completion object, or with `stream` an event stream of them",
                "content": {
                    "application/json": {"schema": _ref("Completion")},
                    "text/event-stream": {"schema": SSE_EVENT},
                },
            },
            **body_errors,
            **auth_errors,
            **{code: ERROR for code in ("404", "429", "500", "503", "504")},
        },
        **secured,
    }
    chat_schema = ChatCompletionRequest.model_json_schema(ref_template=REF)
    defs.update(chat_schema.pop("$defs", {}))
    if model_ids:
        chat_schema["properties"]["model"]["enum"] = list(model_ids)
    _tighten_shared(chat_schema["properties"])
    chat_op = {
        "summary": "Create a chat completion from the model's own chat template (stream: server-sent "
        "`chat.completion.chunk` events ending with `data: [DONE]`)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}}},
        "responses": {
            "200": {
                "description": "a chat.completion object, or with `stream` an event stream of chunks",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": SSE_EVENT},
                },
            },
            **body_errors,
            **auth_errors,
            **{code: ERROR for code in ("404", "429", "500", "503", "504")},
        },
        **secured,
    }
    tokens = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    model = {"type": "string", **({"enum": list(model_ids)} if model_ids else {})}

    def probe(summary: str) -> dict:
        return {"get": {"summary": summary, "responses": {"200": _json(PROBE), "503": _json(PROBE, "not so")}}}

    paths = {
        "/v1/completions": {"post": {**completion_op, "operationId": "createCompletion"}},
        "/completions": {"post": {**copy.deepcopy(completion_op), "operationId": "createCompletionUnversioned"}},
        "/v1/chat/completions": {"post": {**chat_op, "operationId": "createChatCompletion"}},
        "/chat/completions": {"post": {**copy.deepcopy(chat_op), "operationId": "createChatCompletionUnversioned"}},
        "/v1/models": {
            "get": {
                "summary": "List the served models",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["object", "data"],
                            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL_CARD}},
                        }
                    ),
                    **auth_errors,
                    **loading,
                },
                **secured,
            }
        },
        "/v1/models/{model_id}": {
            "get": {
                "summary": "One served model",
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(MODEL_CARD), "404": ERROR, **auth_errors, **loading},
                **secured,
            }
        },
        "/health": probe("200 once the engine runs; 503 while loading or after a failure (vLLM's meaning)"),
        "/live": probe("liveness: 200 while the process answers and its engine has not failed"),
        "/ready": probe("readiness: 200 when the model is loaded, the engine runs and the server is not draining"),
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }
        },
        "/tokenize": {
            "post": {
                "summary": "Token ids of a prompt",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["prompt"],
                                "properties": {"prompt": {"type": "string"}, "model": model},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["tokens", "count", "max_model_len"],
                            "properties": {
                                "tokens": tokens,
                                "count": {"type": "integer"},
                                "max_model_len": {"type": "integer"},
                            },
                        }
                    ),
                    **body_errors,
                    **auth_errors,
                    "404": ERROR,
                    **loading,
                },
                **secured,
            }
        },
        "/detokenize": {
            "post": {
                "summary": "Text of token ids",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["tokens"],
                                "properties": {"tokens": tokens, "model": model},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}
                    ),
                    **body_errors,
                    **auth_errors,
                    "404": ERROR,
                    **loading,
                },
                **secured,
            }
        },
        "/tokenizer_info": {
            "get": {
                "summary": "Special tokens (the shape lm-evaluation-harness reads)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "eos_token": NULLABLE_STR,
                                "bos_token": NULLABLE_STR,
                                "pad_token": NULLABLE_STR,
                                "add_bos_token": {"type": "boolean"},
                                "vocab_size": {"type": "integer"},
                                "model_max_length": {"type": "integer"},
                            },
                        }
                    ),
                    **auth_errors,
                    **loading,
                },
                **secured,
            }
        },
    }
    components: dict = {
        "schemas": {
            "CompletionRequest": request_schema,
            "ChatCompletionRequest": chat_schema,
            **defs,
            "Completion": COMPLETION,
            "Error": ERROR_SCHEMA,
        }
    }
    if api_key:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jaxserve",
            "version": "0.1.0",
            "description": "OpenAI-compatible Completions API served by jaxserve",
        },
        "paths": paths,
        "components": components,
    }
