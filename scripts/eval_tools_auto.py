"""What `tool_choice: "auto"` does on a served model: how often it calls when it should, and how often it
calls when it should not, on a small hand-written set (three tools; questions that need one of them, and
questions that need none). Prints the counts; asserts nothing.

    python scripts/eval_tools_auto.py --base-url http://127.0.0.1:8000 [--temperature 0] [--n 1]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai


def fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [
    fn("get_weather", "Get the current weather in a city", {"city": {"type": "string"}}, ["city"]),
    fn("get_time", "Get the current time in a city", {"city": {"type": "string"}}, ["city"]),
    fn(
        "convert_currency",
        "Convert an amount of money from one currency to another",
        {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
        ["amount", "from", "to"],
    ),
]

SHOULD_CALL = [
    ("What's the weather like in Paris right now?", "get_weather"),
    ("Is it raining in London today?", "get_weather"),
    ("How hot is it in Cairo at the moment?", "get_weather"),
    ("Tell me the current weather in Tokyo.", "get_weather"),
    ("What time is it in New York?", "get_time"),
    ("Can you tell me the local time in Sydney?", "get_time"),
    ("What's the time in Berlin right now?", "get_time"),
    ("Convert 100 US dollars to euros.", "convert_currency"),
    ("How many Japanese yen is 50 British pounds?", "convert_currency"),
    ("I have 20 euros; how much is that in Swiss francs?", "convert_currency"),
]
SHOULD_NOT = [
    "Hi! How are you?",
    "Write a haiku about the sea.",
    "What is the capital of Italy?",
    "Explain what photosynthesis is in one sentence.",
    "What is 7 times 8?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for 'happy'.",
    "Tell me a short joke.",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--n", type=int, default=1, help="choices per question")
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args()
    client = openai.OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key="x", max_retries=0, timeout=900)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    def ask(question: str):
        return client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": question}],
            tools=TOOLS,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            n=args.n,
        )

    started = time.perf_counter()
    questions = [q for q, _ in SHOULD_CALL] + SHOULD_NOT
    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(questions, pool.map(ask, questions)))
    counts = dict(called=0, right_tool=0, valid_args=0, no_call=0, false_calls=0)
    for question, want in SHOULD_CALL:
        for c in answers[question].choices:
            calls = c.message.tool_calls or []
            counts["called"] += bool(calls)
            counts["right_tool"] += bool(calls) and calls[0].function.name == want
            try:
                for call in calls:
                    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
                counts["valid_args"] += bool(calls)
            except (json.JSONDecodeError, jsonschema.ValidationError, KeyError):
                pass
            made = [(x.function.name, x.function.arguments) for x in calls]
            print(f"[call?] {question!r}: {made or c.message.content!r}")
    for question in SHOULD_NOT:
        for c in answers[question].choices:
            calls = c.message.tool_calls or []
            counts["false_calls"] += bool(calls)
            counts["no_call"] += not calls
            print(f"[text?] {question!r}: {[x.function.name for x in calls] or (c.message.content or '')[:80]!r}")
    total_call, total_not = len(SHOULD_CALL) * args.n, len(SHOULD_NOT) * args.n
    print(
        f"\nshould call: called {counts['called']}/{total_call}, right tool {counts['right_tool']}/{total_call}, "
        f"arguments valid {counts['valid_args']}/{counts['called']}\n"
        f"should not call: in text {counts['no_call']}/{total_not}, called {counts['false_calls']}/{total_not}\n"
        f"({time.perf_counter() - started:.0f} s, temperature {args.temperature}, n {args.n})"
    )


if __name__ == "__main__":
    main()
