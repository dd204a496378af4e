"""Tool calling on the Chat Completions API: `tools`, `tool_choice`, `parallel_tool_calls` and the tool
history validated (a 400 naming the field), the messages made ready for the chat template, and the answers
shaped as OpenAI sends them (`message.tool_calls`, `finish_reason: "tool_calls"`, streamed call deltas).

A template that takes `tools` (Qwen 2.5/3, Llama 3.1/3.2, Mistral, Hermes-style) gets them, and the
history as transformers passes it (a call's arguments as an object, not the JSON text clients send). One
that does not (SmolLM2's, Gemma 3's) gets the fallback: the tools described in the system turn in the
Hermes format, earlier calls written as `<tool_call>` blocks in the assistant's turn, and tool results as a
user turn of `<tool_response>` blocks. The model's answer is read in its format (`engine.toolcalls`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from jaxserve.api.protocol import APIError, check_unicode
from jaxserve.engine.toolcalls import (
    FORMATS,
    CallFormat,
    CallStream,
    Parsed,
    Tool,
    ToolCall,
    compile_tool_grammar,
    format_for,
)
from jaxserve.engine.types import RequestError
from jaxserve.tokenizer import Tokenizer

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """The request's tools as validated: `choice` is none, auto, required, or the named function's name."""

    tools: tuple[Tool, ...]
    choice: str
    named: bool
    parallel: bool


def parse_spec(tools: Any, tool_choice: Any, parallel: bool | None) -> ToolSpec | None:
    """The request's tool fields -> a ToolSpec, or None when the model is to answer in text only."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of tools", param="tools")
    parsed = tuple(_tool(i, t) for i, t in enumerate(tools))
    names = [t.name for t in parsed]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise APIError(400, f"tools[{i}]: a second tool named {name!r}", param=f"tools[{i}].function.name")
    choice, named = _choice(tool_choice, names)
    if choice == "none" or not parsed:
        return None
    return ToolSpec(parsed, choice, named, True if parallel is None else parallel)


def _tool(i: int, t: Any) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise APIError(400, f"{where} must be {{'type': 'function', 'function': {{...}}}}", param=f"{where}.type")
    f = t["function"]
    name = f.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise APIError(
            400,
            f"{where}.function.name must be 1-64 of a-z, A-Z, 0-9, _ and - (received {name!r})",
            param=f"{where}.function.name",
        )
    description = f.get("description")
    if description is not None and not isinstance(description, str):
        raise APIError(400, f"{where}.function.description must be a string", param=f"{where}.function.description")
    params = f.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise APIError(
            400, f"{where}.function.parameters must be a JSON schema object", param=f"{where}.function.parameters"
        )
    try:
        check_unicode(json.dumps(t, ensure_ascii=False))
    except ValueError as e:
        raise APIError(400, f"{where}: {e}", param=where) from None
    return Tool(name, description, json.dumps(params, ensure_ascii=False, separators=(",", ":")))


def _choice(tool_choice: Any, names: list[str]) -> tuple[str, bool]:
    if tool_choice is None:
        return "auto", False
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, False
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise APIError(
                400,
                f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                param="tool_choice",
            )
        return name, True
    raise APIError(
        400,
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


# ---- the history --------------------------------------------------------------------------------------


def message_fields(where: str, m: dict, out: dict) -> dict:
    """Add a message's tool fields to its template form `out`: an assistant's `tool_calls` (arguments
    parsed to objects), a tool message's `tool_call_id` and `name`."""
    if out["role"] == "assistant" and m.get("tool_calls"):
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise APIError(400, f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
        out["tool_calls"] = [_history_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
    if out["role"] == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str):
            raise APIError(
                400,
                f"{where}.tool_call_id must be given: the id of the call this answers",
                param=f"{where}.tool_call_id",
            )
        out["tool_call_id"] = call_id
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
    return out


def _history_call(where: str, c: Any) -> dict:
    f = c.get("function") if isinstance(c, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(c.get("id"), str):
        raise APIError(
            400, f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}", param=where
        )
    args = f.get("arguments", "{}")
    if isinstance(args, str):  # clients send JSON text; templates that `tojson` it would encode it twice
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise APIError(
                400, f"{where}.function.arguments is not JSON", param=f"{where}.function.arguments"
            ) from None
    if not isinstance(args, dict):
        raise APIError(400, f"{where}.function.arguments must be a JSON object", param=f"{where}.function.arguments")
    return {"id": c["id"], "type": "function", "function": {"name": f["name"], "arguments": args}}


def check_history(messages: list[dict]) -> None:
    """Each tool message answers an earlier call; its `name` is that call's where the client left it out."""
    calls: dict[str, str] = {}
    for i, m in enumerate(messages):
        for c in m.get("tool_calls", ()):
            calls[c["id"]] = c["function"]["name"]
        if m["role"] == "tool":
            if m["tool_call_id"] not in calls:
                raise APIError(
                    400,
                    f"messages[{i}] answers tool call {m['tool_call_id']!r}, which no earlier message made",
                    param=f"messages[{i}].tool_call_id",
                )
            m.setdefault("name", calls[m["tool_call_id"]])


# ---- the prompt ---------------------------------------------------------------------------------------


def takes_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template) is not None  # type: ignore[arg-type]


def _openai_tool(t: Tool) -> dict:
    function: dict[str, Any] = {"name": t.name}
    if t.description is not None:
        function["description"] = t.description
    function["parameters"] = json.loads(t.parameters)
    return {"type": "function", "function": function}


def hermes_system(tools: tuple[Tool, ...]) -> str:
    """The tools described as Hermes-format models are trained to read them."""
    lines = "\n".join(json.dumps(_openai_tool(t), ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def template_inputs(messages: list[dict], spec: ToolSpec | None, template: str | None) -> tuple[list[dict], dict]:
    """(messages, extra template variables) for rendering: `tools=` where the template takes them, else
    the Hermes fallback written into the messages."""
    if takes_tools(template):
        return messages, ({"tools": [_openai_tool(t) for t in spec.tools]} if spec else {})
    out = _hermes_history(messages)
    if spec is not None:
        system = hermes_system(spec.tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, {}


def _hermes_history(messages: list[dict]) -> list[dict]:
    """Calls written into their assistant turn as <tool_call> blocks; a run of tool results as one user
    turn of <tool_response> blocks; other messages as they are."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif "tool_calls" in m:
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            blocks = [f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls]
            out.append({"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + blocks)})
        else:
            out.append(m)
    return out


# ---- serving ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """How one request's answers are constrained and read."""

    spec: ToolSpec
    fmt: CallFormat
    grammar: str  # every choice follows it: calls only (required, named), or text until a call starts (auto)


def plan(spec: ToolSpec | None, tok: Tokenizer, parser: str | None) -> ToolPlan | None:
    if spec is None:
        return None
    fmt = FORMATS[parser] if parser else format_for(tok.chat_template, takes_tools(tok.chat_template))
    tools = tuple(t for t in spec.tools if t.name == spec.choice) if spec.named else spec.tools
    try:
        grammar = compile_tool_grammar(fmt, tok, tools, spec.parallel and not spec.named, lazy=spec.choice == "auto")
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    return ToolPlan(spec, fmt, grammar)


def _finish(plan: ToolPlan, parsed: Parsed, reason: str | None) -> str | None:
    # OpenAI: "tool_calls" when the model called, but "stop" when tool_choice named the function; a
    # generation cut by max_tokens stays "length" (its whole calls are calls, the one it cut is content)
    if not parsed.calls or reason != "stop":
        return reason
    return "stop" if plan.spec.named else "tool_calls"


def _call(plan: ToolPlan, call: ToolCall) -> dict:
    return {"id": plan.fmt.new_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def message(plan: ToolPlan, text: str, reason: str | None) -> tuple[dict, str | None]:
    """A whole choice's text -> (its message, its finish_reason)."""
    parsed = plan.fmt.parse(text)
    out: dict[str, Any] = {"role": "assistant", "content": parsed.content, "refusal": None}
    if parsed.calls:
        out["tool_calls"] = [_call(plan, c) for c in parsed.calls]
    return out, _finish(plan, parsed, reason)


class ChoiceStream:
    """One streamed choice: content deltas as they are safe, each call as soon as it is whole, in OpenAI's
    delta shape (the call's index, id, type and name first, then its arguments)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self._text = CallStream(plan.fmt)
        self._calls = 0

    def feed(self, text: str) -> list[dict]:
        """New text -> the deltas to send now."""
        content, calls = self._text.feed(text)
        return ([{"content": content}] if content else []) + self._deltas(calls)

    def _deltas(self, calls) -> list[dict]:
        out = []
        for call in calls:
            head = _call(self.plan, call)
            arguments = head["function"]["arguments"]
            head["function"] = {"name": call.name, "arguments": ""}
            out += [
                {"tool_calls": [{"index": self._calls, **head}]},
                {"tool_calls": [{"index": self._calls, "function": {"arguments": arguments}}]},
            ]
            self._calls += 1
        return out

    def finish(self, reason: str) -> tuple[list[dict], str | None]:
        """-> (the last deltas, the finish_reason)."""
        rest = self._text.finish()
        deltas = ([{"content": rest.content}] if rest.content else []) + self._deltas(rest.calls)
        return deltas, _finish(self.plan, self.plan.fmt.parse(self._text.text), reason)
