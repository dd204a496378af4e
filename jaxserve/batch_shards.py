"""One batch spread over many machines: which requests a shard runs, and one output from the shards' outputs.

A shard is a fixed 1/N of the input's requests: the k-th request (blank lines skipped) goes to shard k mod N.
Every machine computes the same split from the same file with nothing shared between them, and prompts
whose length drifts through the file are dealt out evenly. Each shard appends to its own output file, so
each resumes on its own (batch.py skips the custom_ids already in it).

The merge checks everything before it writes anything: a custom_id of the input that no shard output has
(a shard not finished), one found twice (an output given twice, or outputs of two different splits), one
the input does not have (another batch's output) and a line cut short (a shard stopped mid-write) are each
refused with the custom_ids or lines named. Lines are copied byte for byte, in the input's order, read back
by offset: the merge holds the ids, never the results.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from jaxserve.batch import Item

SHOWN = 10  # ids named in an error; the rest are counted


class MergeError(ValueError):
    pass


def select_shard(items: list[Item], index: int, count: int) -> list[Item]:
    """Shard `index` of `count`: every count-th request of the input, from the index-th on."""
    assert 0 <= index < count, (index, count)
    return items[index::count]


def _named(ids: list[str]) -> str:
    more = f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
    return ", ".join(ids[:SHOWN]) + more


def merge_outputs(custom_ids: list[str], shard_outputs: list[Path], output: Path) -> int:
    """Write `output`: for each of the input's `custom_ids` in order, its result line from the shard outputs.
    Returns how many of those results carry an error status (a bad input line answered with a 4xx)."""
    expected = set(custom_ids)
    where: dict[str, tuple[int, int, int]] = {}  # custom_id -> (shard output, byte offset, length)
    failed: set[str] = set()
    duplicated: dict[str, list[str]] = {}
    unknown: list[str] = []
    for shard, path in enumerate(shard_outputs):
        offset = 0
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    raise MergeError(f"{path}: line {n} is cut short (its shard stopped mid-write): rerun that shard")
                try:
                    result = json.loads(raw)
                    cid = result["custom_id"]
                    status = result["response"]["status_code"]
                except (ValueError, KeyError, TypeError):
                    raise MergeError(f"{path}: line {n} is not a batch result line") from None
                if cid not in expected:
                    unknown.append(f"{cid} ({path})")
                elif cid in where:
                    first = shard_outputs[where[cid][0]]
                    duplicated.setdefault(cid, [str(first)]).append(str(path))
                else:
                    where[cid] = (shard, offset, len(raw))
                    if status != 200:
                        failed.add(cid)
                offset += len(raw)
    problems = []
    if missing := [cid for cid in custom_ids if cid not in where]:
        problems.append(
            f"custom_id missing from every shard output ({len(missing)} of {len(custom_ids)}; is a shard "
            f"unfinished?): {_named(missing)}"
        )
    if duplicated:
        places = [f"{cid} ({' and '.join(paths)})" for cid, paths in duplicated.items()]
        problems.append(f"custom_id in more than one result line: {_named(places)}")
    if unknown:
        problems.append(f"custom_id not in the input: {_named(unknown)}")
    if problems:
        raise MergeError("; ".join(problems) + f"; nothing written to {output}")

    partial = output.with_name(output.name + ".partial")
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(path, "rb")) for path in shard_outputs]
        with open(partial, "wb") as out:
            for cid in custom_ids:
                shard, offset, length = where[cid]
                files[shard].seek(offset)
                out.write(files[shard].read(length))
    os.replace(partial, output)  # a merge stopped midway leaves no output that looks whole
    return len(failed)
