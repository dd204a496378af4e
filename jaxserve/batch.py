"""Batch completions over JSONL files, in-process (no HTTP), in OpenAI's Batch API format.

Input lines: {"custom_id", "method": "POST", "url": "/v1/completions" or "/v1/chat/completions", "body": {...}};
or, in the plain
form, one prompt per line (text, or JSON {"prompt": ...}) with the body's other fields given once.
Output lines: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null} with
the same body the server returns (or the 4xx error body).

Nothing is lost: a bad line becomes an error line and the batch goes on; each result is appended and
flushed as it completes; a rerun skips custom_ids already in the output (repairing a torn last line), so
an interrupted job resumes without duplicates. Requests are submitted shortest prompt first, so short
prompts are prefilled together in packed batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from pathlib import Path

from tqdm import tqdm

from jaxserve.api.chat import ChatServing, parse_chat_request
from jaxserve.api.protocol import APIError, parse_completion_request
from jaxserve.api.serving import CompletionServing

log = logging.getLogger(__name__)

URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"


@dataclasses.dataclass
class Item:
    line: int
    custom_id: str
    body: dict | None = None
    url: str = URL
    error: APIError | None = None  # the line is unusable: written as an error line without running
    cost: int = 0  # prompt tokens, to order the work


class DuplicateIds(ValueError):
    pass


def parse_batch_lines(lines: list[str]) -> list[Item]:
    """OpenAI Batch API lines -> items; a malformed line becomes an item with its error."""
    items = []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            items.append(Item(n, f"line-{n}", error=APIError(400, f"line {n} is not valid JSON")))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str) or not obj["custom_id"]:
            items.append(
                Item(n, f"line-{n}", error=APIError(400, f"line {n} has no string 'custom_id'", param="custom_id"))
            )
            continue
        cid = obj["custom_id"]
        if obj.get("url") not in (URL, CHAT_URL) or obj.get("method", "POST") != "POST":
            items.append(
                Item(
                    n,
                    cid,
                    error=APIError(
                        400,
                        f"line {n}: only POST {URL} and {CHAT_URL} are supported, "
                        f"got {obj.get('method', 'POST')} {obj.get('url')}",
                        param="url",
                    ),
                )
            )
        elif not isinstance(obj.get("body"), dict):
            items.append(Item(n, cid, error=APIError(400, f"line {n} has no JSON object 'body'", param="body")))
        else:
            items.append(Item(n, cid, body=obj["body"], url=obj["url"]))
    return items


def parse_prompt_lines(lines: list[str], defaults: dict) -> list[Item]:
    """Plain form: each line a prompt (text, or JSON with 'prompt' and optional overrides)."""
    items = []
    for n, text in enumerate(lines, 1):
        text = text.rstrip("\n")
        if not text.strip():
            continue
        body = None
        if text.lstrip().startswith("{"):
            try:
                obj = json.loads(text)
                if isinstance(obj, dict) and "prompt" in obj:
                    body = {**defaults, **obj}
            except ValueError:
                pass
        items.append(
            Item(n, str((body or {}).pop("custom_id", f"line-{n}")), body=body or {**defaults, "prompt": text})
        )
    return items


def check_duplicates(items: list[Item]) -> None:
    seen, dups = set(), []
    for item in items:
        if item.custom_id in seen:
            dups.append(item.custom_id)
        seen.add(item.custom_id)
    if dups:
        raise DuplicateIds(
            f"duplicate custom_id in the input: {', '.join(sorted(set(dups))[:10])}"
            + (" ..." if len(set(dups)) > 10 else "")
        )


def completed_ids(output: Path) -> set[str]:
    """custom_ids already in `output`, after cutting a torn last line (a crash mid-write) off the file."""
    if not output.exists():
        return set()
    raw = output.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        log.warning("cutting a torn last line off %s", output)
        with open(output, "r+b") as f:
            f.truncate(keep)
    done = set()
    for line in raw[:keep].decode("utf-8").splitlines():
        if line.strip():
            done.add(json.loads(line)["custom_id"])
    return done


def result_line(custom_id: str, status: int, body: dict) -> str:
    request_id = body.get("id") if status == 200 else f"req_{uuid.uuid4().hex}"
    return json.dumps(
        {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        },
        allow_nan=False,
    )


@dataclasses.dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        return (
            f"{self.ok} ok, {self.failed} failed, {self.skipped} already done; {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} generated tokens in {self.seconds:.1f} s ({rate:.1f} generated tok/s)"
        )


async def run_batch(
    serving: CompletionServing, items: list[Item], output: Path, concurrency: int, progress: bool = True
) -> Summary:
    """Run every item not yet in `output`, appending one line per result as it completes."""
    check_duplicates(items)
    done = completed_ids(output)
    summary = Summary(skipped=sum(item.custom_id in done for item in items))
    todo = [item for item in items if item.custom_id not in done]
    for item in todo:  # shortest prompts first: similar lengths are prefilled together
        prompt = (item.body or {}).get("prompt", (item.body or {}).get("messages"))
        item.cost = len(serving.tokenizer.encode(prompt)) if isinstance(prompt, str) else len(str(prompt))
    todo.sort(key=lambda item: item.cost)
    bar = tqdm(total=len(todo), desc="batch", unit="req", disable=not progress)
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()

    with open(output, "a", encoding="utf-8") as out:

        def write(line: str) -> None:
            out.write(line + "\n")
            out.flush()  # a killed process keeps every completed line

        async def one(item: Item) -> None:
            async with gate:
                try:
                    if item.error:
                        raise item.error
                    body_in = {**item.body, "stream": False}
                    if item.url == CHAT_URL:
                        run = ChatServing(serving).complete
                        req = parse_chat_request(body_in)
                    else:
                        run, req = serving.complete, parse_completion_request(body_in)
                    while True:
                        try:
                            body = await run(req)
                            break
                        except APIError as e:
                            if e.status != 429:  # only "busy" is retried: the queue drains as we wait
                                raise
                            await asyncio.sleep(0.2)
                    status = 200
                    summary.ok += 1
                    summary.prompt_tokens += body["usage"]["prompt_tokens"]
                    summary.completion_tokens += body["usage"]["completion_tokens"]
                except APIError as e:
                    status, body = e.status, e.body()
                    summary.failed += 1
                write(result_line(item.custom_id, status, body))
                bar.update()
                elapsed = time.perf_counter() - started
                bar.set_postfix_str(f"{summary.completion_tokens / max(elapsed, 1e-9):.0f} tok/s")

        await asyncio.gather(*(one(item) for item in todo))
    bar.close()
    summary.seconds = time.perf_counter() - started
    return summary
