"""Write tests/chat_templates/tools_renders.json: chat requests with tools and tool history, each rendered by
`transformers`' own chat-template renderer on tests/chat_templates/tools.jinja, from the messages and tools
jaxserve prepares for the template. tests/test_toolcalls.py renders the same requests with jaxserve and
compares. Needs `pip install transformers` (no torch); not a dependency of jaxserve or its tests.

    python scripts/chat_template_renders.py
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import __version__
from transformers.utils.chat_template_utils import render_jinja_template

from jaxserve.api import tools
from jaxserve.api.chat import parse_chat_request

HERE = Path(__file__).resolve().parent.parent / "tests" / "chat_templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city — «météo»",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALLS = [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
]
REQUESTS = [
    {"messages": [{"role": "user", "content": "Weather in Zürich?"}], "tools": [WEATHER, CLOCK]},
    {"messages": [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}], "tools": [WEATHER]},
    {
        "messages": [
            {"role": "user", "content": "Weather and time in Zürich?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": CALLS},
            {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "09:30"},
        ],
        "tools": [WEATHER, CLOCK],
    },
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]


def main() -> None:
    source = (HERE / "tools.jinja").read_text()
    cases = []
    for body in REQUESTS:
        req = parse_chat_request({"model": "m", **body})
        messages, variables = tools.template_inputs(req.messages, req._tool_spec, source)
        rendered = render_jinja_template(
            [messages], chat_template=source, add_generation_prompt=True, bos_token="<s>", eos_token="</s>", **variables
        )[0][0]
        cases.append({"request": body, "render": rendered})
    out = {"renderer": f"transformers {__version__} render_jinja_template", "cases": cases}
    (HERE / "tools_renders.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
