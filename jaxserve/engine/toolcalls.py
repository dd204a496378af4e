"""Tool calls in the model's own format: reading them out of generated text, and the llguidance grammar
that makes a required call always parse.

A `CallFormat` is one of the formats models are trained on (Hermes `<tool_call>{…}</tool_call>`, Llama 3.x
JSON, Mistral `[TOOL_CALLS][…]`). It knows where a call starts in text (so a stream can hold back what may
still become one), how to parse a whole generation into content and calls (a malformed call is content:
never an error), and the grammar for a call to one of the given tools. Parsing is a pure function of the
text and reads calls from the first marker on until the first that is not well formed, so the calls of a
text's beginning are the first calls of the whole text: a stream sends each call as soon as it is whole,
and still assembles to exactly what the whole text gives unstreamed.

No jax, no pydantic: the API layer and the batch runner use this module as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import secrets
import string
from typing import Any

import llguidance

from jaxserve.engine.grammar import ll_tokenizer
from jaxserve.engine.types import RequestError
from jaxserve.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: str  # its JSON schema, as compact JSON text (a tool is hashable, so grammars are cached)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


@dataclasses.dataclass(frozen=True)
class Parsed:
    content: str | None  # None where calls came with no text but whitespace
    calls: tuple[ToolCall, ...]


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _call(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
    """{"name": str, <args key>: object or JSON text} -> a call; anything else -> None (malformed)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], _compact(args)) if isinstance(args, dict) else None


def _json_values(text: str, pos: int, sep: str) -> list[tuple[Any, int]]:
    """JSON values from text[pos:] separated by `sep` (and whitespace), each with where it ends."""
    decoder = json.JSONDecoder()
    values: list[tuple[Any, int]] = []
    end = pos
    while True:
        at = len(text) - len(text[end:].lstrip())
        if values:
            if not text.startswith(sep, at):
                return values
            at += len(sep)
            at = len(text) - len(text[at:].lstrip())
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return values
        values.append((value, end))


class CallFormat:
    """One model family's tool-call format. `markers` are the texts that start a call."""

    name: str
    markers: tuple[str, ...]
    args_key = "arguments"

    def start(self, text: str) -> int | None:
        """Where the first call starts in `text`, if one has."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def parse(self, text: str) -> Parsed:
        """Generated text -> content and calls. Content is the text around the calls (a call cut short
        included); text with no well-formed call is all content."""
        start = self.start(text)
        calls, end = self.calls(text, start) if start is not None else ([], 0)
        if not calls:
            return Parsed(text, ())
        rest = text[:start] + text[end:]
        return Parsed(rest if rest.strip() else None, tuple(calls))

    def calls(self, text: str, start: int) -> tuple[list[ToolCall], int]:
        """The well-formed calls from `start` on, up to the first that is not, and where they end."""
        raise NotImplementedError

    def new_id(self) -> str:
        return "call_" + secrets.token_hex(12)

    # ---- the grammar --------------------------------------------------------------------------------

    def body_schema(self, tools: tuple[Tool, ...]) -> dict:
        """The JSON schema of one call to any of `tools`."""
        return {"anyOf": [self._one(t) for t in tools]} if len(tools) > 1 else self._one(tools[0])

    def _one(self, tool: Tool) -> dict:
        return {
            "type": "object",
            "properties": {"name": {"const": tool.name}, self.args_key: closed(json.loads(tool.parameters))},
            "required": ["name", self.args_key],
            "additionalProperties": False,
        }

    def grammar(self, tok: Tokenizer, tools: tuple[Tool, ...], parallel: bool, lazy: bool) -> str:
        """Lark for calls to `tools` (one, or one or more when `parallel`); `lazy`: free text unless and
        until the model starts a call (tool_choice auto), else calls only."""
        raise NotImplementedError


# Keys whose value is a schema or a list of schemas, or a map of names to schemas (not const, enum, default...).
_SCHEMA_KEYS = ("items", "additionalProperties", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_OTHER_PROPERTIES = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed(schema: Any) -> Any:
    """A tool's parameters schema with each object that lists its properties closed to any other
    (`additionalProperties: false` where the schema says nothing of other properties), as OpenAI's strict
    mode has them and as xgrammar's strict mode (vLLM's default) and llama.cpp read a schema for generation.
    Open, an object lets a model under the grammar write property after property, repeated keys included,
    until max_tokens: a forced call must end. Objects that list no properties stay free-form maps, and a
    schema that merges objects (`allOf`, or `$ref` beside `properties`) is left as given, since closing one
    part would refuse the other part's properties."""
    return schema if _merges(schema) else _close(schema)


def _merges(value: Any) -> bool:
    if isinstance(value, list):
        return any(_merges(v) for v in value)
    if not isinstance(value, dict):
        return False
    return "allOf" in value or ("$ref" in value and "properties" in value) or any(map(_merges, value.values()))


def _close(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_close(s) for s in schema]
    if not isinstance(schema, dict):
        return schema  # true / false
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {name: _close(s) for name, s in value.items()}
        elif key in _SCHEMA_KEYS:
            value = _close(value)
        out[key] = value
    props, required = out.get("properties"), out.get("required", [])
    if (
        isinstance(props, dict)
        and not any(k in out for k in _OTHER_PROPERTIES)
        and isinstance(required, list)
        and all(
            isinstance(n, str) and n in props for n in required
        )  # a required name not listed is an "other" property
    ):
        out["additionalProperties"] = False
    return out


def _json(schema: dict) -> str:
    # compact JSON, as structured outputs generate it (grammar.compile_response_format)
    return "%json " + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})


def _lit(text: str) -> str:
    return json.dumps(text)


def _free_text_without(marker: str) -> str:
    """A terminal for any text that does not contain `marker`."""
    return rf"/(?s:.*)/ & ~/(?s:.*){re.escape(marker)}(?s:.*)/"


class Hermes(CallFormat):
    """`<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`, one block per call (Qwen 2.5/3, Hermes,
    and the fallback prompt of templates that take no tools)."""

    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"\s*<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def calls(self, text, start):
        calls, end = [], start
        while m := self._block.match(text, end):
            try:
                call = _call(json.loads(m.group(1)), ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            if call is None:
                break
            calls.append(call)
            end = m.end()
        return calls, end

    def grammar(self, tok, tools, parallel, lazy):
        more = ' ("\\n" call)*' if parallel else ""
        rules = [
            "%llguidance {}",
            f"start: TEXT | first{more}" if lazy else f"start: call{more}",
            'call: "<tool_call>\\n" body "\\n</tool_call>"',
            f"body: {_json(self.body_schema(tools))}",
        ]
        if lazy:  # text ends at the first "<tool_call>" (lazy), from there the call is constrained
            rules += [
                f"TEXT: {_free_text_without('<tool_call>')}",
                "head[lazy]: /(?s:.*)<tool_call>/",
                'first: head "\\n" body "\\n</tool_call>"',
            ]
        return "\n".join(rules)


class Llama3Json(CallFormat):
    """Llama 3.1/3.2/3.3 JSON calls: `{"name": …, "parameters": {…}}` as the whole answer (several joined
    by `; `), or after `<|python_tag|>`."""

    name = "llama3_json"
    markers = ("<|python_tag|>",)
    args_key = "parameters"

    def start(self, text):
        stripped = text.lstrip()
        if stripped.startswith("{"):
            return len(text) - len(stripped)
        return super().start(text)

    def calls(self, text, start):
        if text.startswith("<|python_tag|>", start):
            start += len("<|python_tag|>")
        calls, end = [], start
        for value, stop in _json_values(text, start, ";"):
            if (call := _call(value, ("parameters", "arguments"))) is None:
                break
            calls.append(call)
            end = stop
        return calls, end

    def grammar(self, tok, tools, parallel, lazy):
        more = ' ("; " body)*' if parallel else ""
        start = f"body{more}"
        return "\n".join(
            [
                "%llguidance {}",
                f"start: TEXT | {start}" if lazy else f"start: {start}",
                f"body: {_json(self.body_schema(tools))}",
                *(["TEXT: /[^{](?s:.*)/"] if lazy else []),  # an answer that does not open with "{" is text
            ]
        )


class Mistral(CallFormat):
    """`[TOOL_CALLS][{"name": …, "arguments": {…}}, …]` (Mistral 7B v0.3, Mistral Nemo, Small). Mistral's
    templates take only 9-character alphanumeric call ids."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def calls(self, text, start):
        values = _json_values(text, start + len("[TOOL_CALLS]"), "\0")[:1]  # one value: the array
        if not values:
            return [], start
        items, end = values[0]
        calls = [_call(v, ("arguments", "parameters")) for v in (items if isinstance(items, list) else [items])]
        if not calls or None in calls:  # the array is one piece: a malformed item leaves it all to content
            return [], start
        return calls, end  # type: ignore[return-value]

    def new_id(self):
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def grammar(self, tok, tools, parallel, lazy):
        array = {"type": "array", "items": self.body_schema(tools), "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        token = tok.token_id("[TOOL_CALLS]")
        special = token is not None and token in tok.special_ids
        marker = f"<[{token}]>" if special else _lit("[TOOL_CALLS]")
        rules = ["%llguidance {}", f"calls: {_json(array)}"]
        if not lazy:
            return "\n".join([*rules, f"start: {marker} calls"])
        if special:  # free text never produces a special token: the token itself is the trigger
            return "\n".join([*rules, f"start: TEXT | TEXT {marker} calls", "TEXT: /(?s:.*)/"])
        return "\n".join(
            [
                *rules,
                "start: TEXT | head calls",
                f"TEXT: {_free_text_without('[TOOL_CALLS]')}",
                f"head[lazy]: /(?s:.*){re.escape('[TOOL_CALLS]')}/",
            ]
        )


FORMATS: dict[str, CallFormat] = {f.name: f for f in (Hermes(), Llama3Json(), Mistral())}


def format_for(template: str | None, takes_tools: bool) -> CallFormat:
    """The format a chat template teaches: Mistral's or Llama 3.x's markers, else Hermes (also the format of
    the fallback prompt for templates that take no tools)."""
    if takes_tools and template:
        if "[TOOL_CALLS]" in template:
            return FORMATS["mistral"]
        if "<|python_tag|>" in template or "<|eom_id|>" in template:
            return FORMATS["llama3_json"]
    return FORMATS["hermes"]


@functools.lru_cache(maxsize=64)
def compile_tool_grammar(fmt: CallFormat, tok: Tokenizer, tools: tuple[Tool, ...], parallel: bool, lazy: bool) -> str:
    """The grammar of calls to `tools`, validated against the tokenizer once per (format, tools, mode); a
    schema llguidance refuses is a RequestError naming `tools`."""
    grammar = fmt.grammar(tok, tools, parallel, lazy)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer(tok))
    if is_error:
        raise RequestError(f"a tool's parameters schema is not supported: {messages[0]}", "tools")
    return grammar


class CallStream:
    """One streamed choice's text with calls in it: content is let out as it comes, except what may still
    become a call (a marker's beginning, and from a marker on); each call as soon as it is whole. Together
    they are exactly `parse` of the whole text."""

    def __init__(self, fmt: CallFormat):
        self.fmt = fmt
        self.text = ""
        self.sent = 0  # characters of `text` already sent as content
        self.called = 0  # calls already sent

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """New text -> (the content safe to send now, the calls completed by it)."""
        self.text += delta
        start = self.fmt.start(self.text)
        calls: list[ToolCall] = []
        if start is not None:
            calls = self.fmt.calls(self.text, start)[0][self.called :]
            self.called += len(calls)
        safe = self._undecided(self.text if start is None else self.text[:start])
        if safe <= self.sent:
            return "", calls
        out, self.sent = self.text[self.sent : safe], safe
        return out, calls

    def _undecided(self, text: str) -> int:
        """Where the held tail begins: trailing whitespace (content is null when only calls follow) and
        any suffix that is the beginning of a marker."""
        cut = len(text)
        for marker in self.fmt.markers:
            for k in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:k]):
                    cut = min(cut, len(text) - k)
                    break
        return len(text[:cut].rstrip())

    def finish(self) -> Parsed:
        """The rest, when the choice has ended: content not yet sent, and calls not yet sent."""
        parsed = self.fmt.parse(self.text)
        return Parsed((parsed.content or "")[self.sent :], parsed.calls[self.called :])
