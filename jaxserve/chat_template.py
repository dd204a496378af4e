"""A model's own chat template, rendered as transformers renders it: Jinja2 in an immutable sandbox (templates
come with downloaded weights, so they may read what they are given and nothing else), with `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `strftime_now` (Llama 3.2's date
line) and a `tojson` filter that keeps non-ASCII text. Never `eval`.

Also the end-of-turn tokens: a chat model ends its answer with its template's turn delimiter
(`<|im_end|>`, `<end_of_turn>`, ...), which must end a generation as EOS does.
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxserve.tokenizer import Tokenizer

# turn delimiters of the common template families; one ends a generation when the template writes it
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|eot|>", "<|end_of_text|>")


class TemplateError(ValueError):
    """The template raised (raise_exception) or failed to render these messages."""


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def token_text(tok: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tok.token_bytes(token_id).decode("utf-8", errors="replace")


def render(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The prompt text for `messages` ({"role", "content"} dicts, and tool fields) by the tokenizer's chat
    template; `variables` (such as `tools`) are passed to the template as they are."""
    if not tok.chat_template:
        raise TemplateError("this model has no chat template")
    try:
        return _compile(tok.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=token_text(tok, tok.bos_id),
            eos_token=token_text(tok, tok.eos_id),
            **variables,
        )
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"the model's chat template failed: {e}") from None


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat: a template that writes the BOS itself does not get a second one."""
    ids = tok.encode(text)
    if tok.add_bos and tok.bos_id is not None and ids[:2] == [tok.bos_id, tok.bos_id]:
        ids = ids[1:]
    return ids


def end_of_turn_ids(tok: Tokenizer) -> tuple[int, ...]:
    """Ids of the turn delimiters the template writes: they end a generation besides the EOS ids."""
    if not tok.chat_template:
        return ()
    ids = (tok.token_id(name) for name in END_OF_TURN if name in tok.chat_template)
    return tuple(i for i in ids if i is not None)
