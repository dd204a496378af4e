"""Structured outputs on the host: a `response_format` compiled to an llguidance grammar, and one matcher per
constrained choice that gives the packed token bitmask of its next token.

The mask is `[ceil(V/32)]` int32, bit `t % 32` of word `t // 32` set when token t is allowed (llguidance's
layout); an unconstrained slot's row is all ones (-1). The device applies it inside the jitted step
(`sampling.sample`); the matcher only ever sees tokens its own masks allowed, so the text always parses.
No jax here: the HTTP layer compiles and validates grammars with this module too.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask

from jaxserve.engine.types import RequestError
from jaxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_lock = threading.Lock()


def mask_words(vocab: int) -> int:
    """int32 words of a packed mask over `vocab` tokens."""
    return (vocab + 31) // 32


def ll_tokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    """The tokenizer as llguidance sees it (every token's bytes, the specials, every EOS id); built once."""
    with _lock:
        cached = getattr(tok, "_llguidance", None)
        if cached is None:

            class _Source:
                eos_token_id = tok.eos_id if tok.eos_id is not None else 0
                bos_token_id = tok.bos_id
                tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
                special_token_ids = sorted(tok.special_ids)

                def __call__(self, text):
                    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
                    ids = tok.encode(text)
                    return ids[1:] if tok.add_bos and ids[:1] == [tok.bos_id] else ids

            eos = list(tok.eos_ids) or None
            cached = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Source()), eos_token=eos)
            tok._llguidance = cached  # type: ignore[attr-defined]
        return cached


def compile_response_format(response_format: Any, tok: Tokenizer) -> str | None:
    """OpenAI's `response_format` -> an llguidance grammar, or None for plain text. A format llguidance
    rejects is a RequestError naming `response_format`."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise RequestError("response_format must be an object with a 'type'", "response_format")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise RequestError(
                "response_format.json_schema must be an object with a 'schema' object", "response_format"
            )
        schema = spec.get("schema") or {"type": "object"}
    else:
        raise RequestError(
            f"response_format type {kind!r} is not supported (text, json_object, json_schema)", "response_format"
        )
    try:
        # whitespace stays free only where the schema allows it; a compact JSON is what the model is led to
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
    except (ValueError, TypeError) as e:
        raise RequestError(f"invalid response_format schema: {e}", "response_format") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer(tok))
    if is_error:
        raise RequestError(f"response_format schema not supported: {messages[0]}", "response_format")
    return grammar


class Matcher:
    """One constrained choice: consumes its tokens, gives the mask of its next one."""

    def __init__(self, tok: Tokenizer, grammar: str, vocab: int):
        self._tok = ll_tokenizer(tok)
        self._m = llguidance.LLMatcher(self._tok, grammar, log_level=0)
        self._words = mask_words(vocab)
        self._own = np.zeros((1, mask_words(self._tok.vocab_size)), np.int32)
        if self._m.is_error():
            raise RequestError(f"response_format: {self._m.get_error()}", "response_format")

    def consume(self, token: int) -> None:
        if not self._m.is_stopped() and not self._m.consume_token(token):
            log.warning("a constrained choice produced a token its grammar refuses: %s", self._m.get_error())

    def mask(self) -> np.ndarray:
        """The next token's packed mask [ceil(V/32)] int32 (the model's V; ids past the tokenizer's are off)."""
        fill_next_token_bitmask(self._m, self._own, 0)
        out = np.zeros((self._words,), np.int32)
        n = min(self._words, self._own.shape[1])
        out[:n] = self._own[0, :n]
        return out

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None
