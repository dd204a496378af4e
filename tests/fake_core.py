"""A device runner whose arithmetic is checkable by hand, executing the same plans (the `Runner` contract) as
JaxRunner, part by part in the plan's order.

The first token after a prompt is (last prompt token + 1); every step adds 1 to each active slot's token;
the logprob of token t is -t/100, and so are its top 5. EOS is token 50. A slot with a grammar mask takes
the lowest id the mask allows from that token up (vocabulary: 64 tokens, 2 words), under the mask it has
when `sample` (a step's second half) runs.
Every part a plan runs is recorded as a call, so admission, slot reuse, abort and one-step-late processing
are visible.

Its KV cache holds the tokens themselves: `kv[page][offset]`, written through the page table by prefill
and step, copied by copy_page. A prefill continues from what its slot's pages hold: the first token after
it is the token read back at the last position + 1, so a wrong page in the table gives a wrong token. It
asserts what the scheduler owes it: a page for every position written, and cached positions a prefill
skips holding exactly the tokens it was given.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxserve.engine.contract import Executed, Runner, walk
from jaxserve.engine.plan import PrefillRow, SamplePlan, Start, StepPlan

EOS = 50
VOCAB = 64


def allowed_ids(mask) -> list[int]:
    """The ids a packed mask [ceil(V/32)] int32 allows."""
    return [t for t in range(VOCAB) if (int(mask[t // 32]) >> (t % 32)) & 1]


@dataclasses.dataclass
class Prefilled:
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    last_logits: list  # here: each row's last prompt token, which the insert continues from


@dataclasses.dataclass
class Stepped:
    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    done: np.ndarray
    valid: np.ndarray
    call: int | None = None  # a step's: where its `sample` is in FakeCore.calls

    @classmethod
    def of(cls, tokens, done, valid) -> Stepped:
        tokens = np.asarray(tokens)
        return cls(
            tokens,
            -tokens / 100.0,
            np.stack([tokens] * 5, -1),
            np.stack([-tokens / 100.0] * 5, -1),
            np.asarray(done),
            np.asarray(valid),
        )


class FakeCore(Runner):
    def __init__(self, slots: int = 4, cache_len: int = 64, chunk: int = 4, pages: int | None = None, page_size=4):
        self.slots, self.cache_len, self.chunk = slots, cache_len, chunk
        self.page_size, self.pages_per_seq = page_size, -(-cache_len // page_size)
        self.pages = slots * self.pages_per_seq if pages is None else pages
        self.kv: list[list[int | None]] = [[None] * page_size for _ in range(self.pages)]
        self.eos_ids, self.vocab_size = (EOS,), VOCAB
        self.masks: list = [None] * slots  # each slot's allowed ids (None: all)
        self.tokens = np.zeros(slots, int)
        self.positions = np.zeros(slots, int)
        self.active = np.zeros(slots, bool)
        self.remaining = np.zeros(slots, int)
        self.stop_eos = np.zeros(slots, bool)
        self.calls: list[tuple] = []
        self.logits: np.ndarray | None = None  # the last plan's decode "logits"
        self.max_loras = 2
        self.adapter = np.zeros(slots, int)  # each slot's LoRA adapter (its arithmetic ignores it)
        self.loaded: dict[int, str] = {}  # adapter index -> the path loaded there

    def execute(self, plan: StepPlan) -> Executed:
        executed, self.logits = walk(plan, self)
        return executed

    def sample_tokens(self, plan: SamplePlan) -> Stepped:
        if plan.slots:
            self.set_masks(list(plan.slots), list(plan.masks))
        return self.sample(self.logits)

    def packing(self, count: int, longest: int) -> tuple[int, int] | None:
        """Up to 4 whole prompts of at most 2 tokens go in one call."""
        return (4, 2) if count <= 4 and longest <= 2 else None

    def _where(self, table, slot: int, position: int) -> tuple[int, int]:
        page = int(table[slot, position // self.page_size])
        assert page < self.pages, f"slot {slot} has no page for position {position}"
        return page, position % self.page_size

    def prefill(self, rows: list[PrefillRow], table, score: bool = False) -> Prefilled:
        self.calls.append(("prefill", tuple((r.slot, r.start, len(r.tokens)) for r in rows)))
        T = max(len(r.tokens) for r in rows)
        logprobs = np.zeros((len(rows), T))
        last: list = []
        for i, r in enumerate(rows):
            logprobs[i, : len(r.targets)] = -np.asarray(r.targets) / 100.0
            for t, token in enumerate(r.tokens):
                page, offset = self._where(table, r.slot, r.start + t)
                if r.start + t < r.write_from:
                    assert self.kv[page][offset] == token, "a cached page holds other tokens"
                else:
                    self.kv[page][offset] = token
            page, offset = self._where(table, r.slot, r.start + len(r.tokens) - 1)
            last.append(self.kv[page][offset])
        return Prefilled(logprobs, np.zeros((len(rows), T, 5), int), np.zeros((len(rows), T, 5)), last)

    def copy_page(self, src: int, dst: int) -> None:
        self.calls.append(("copy_page", src, dst))
        self.kv[dst] = list(self.kv[src])

    def _pick(self, slot: int, token: int) -> int:
        allowed = self.masks[slot]
        if allowed is None:
            return token
        return min([t for t in allowed if t >= token] or allowed)

    def insert(self, start: Start, logits) -> Stepped:
        slot = start.slot
        self.calls.append(("insert", slot))
        self.adapter[slot] = start.adapter
        self.masks[slot] = None if start.mask is None else allowed_ids(start.mask)
        token = self._pick(slot, logits + 1)
        done = start.max_tokens <= 1 or (start.stop_on_eos and token == EOS)
        self.tokens[slot], self.active[slot] = token, not done
        self.remaining[slot], self.stop_eos[slot] = start.max_tokens - 1, start.stop_on_eos
        self.positions[slot] = start.position
        return Stepped.of([token], [done], [True])

    def resume(self, start: Start) -> None:
        slot = start.slot
        self.calls.append(("resume", slot))
        self.adapter[slot] = start.adapter
        self.masks[slot] = None if start.mask is None else allowed_ids(start.mask)
        self.tokens[slot], self.positions[slot], self.active[slot] = start.token, start.position, start.max_tokens > 0
        self.remaining[slot], self.stop_eos[slot] = start.max_tokens, start.stop_on_eos

    def forward(self, table, max_position: int, max_slot: int) -> np.ndarray:
        time.sleep(0.002)  # a device step takes time: lets an abort land mid-stream
        self.calls.append(("forward", tuple(np.flatnonzero(self.active))))
        for slot in np.flatnonzero(self.active):
            page, offset = self._where(table, int(slot), int(self.positions[slot]))
            self.kv[page][offset] = int(self.tokens[slot])
        return self.tokens + 1  # the "logits": each slot's next token before its mask

    def sample(self, logits) -> Stepped:
        self.calls.append(("sample", tuple(np.flatnonzero(self.active))))
        valid = self.active.copy()
        self.positions += valid
        nxt = [self._pick(s, int(t)) for s, t in enumerate(logits)]
        self.tokens = np.where(valid, nxt, self.tokens)
        self.remaining -= valid
        done = valid & ((self.remaining <= 0) | (self.stop_eos & (self.tokens == EOS)))
        self.active &= ~done
        return dataclasses.replace(Stepped.of(self.tokens.copy(), done, valid), call=len(self.calls) - 1)

    def set_masks(self, slots: list[int], masks: list) -> None:
        self.calls.append(("set_masks", tuple(slots)))
        for slot, mask in zip(slots, masks):
            self.masks[slot] = allowed_ids(mask)

    def release(self, slot: int) -> None:
        self.calls.append(("release", slot))
        self.active[slot] = False

    def stats(self) -> dict:
        return {}  # it compiles nothing and serves no model

    def idle(self) -> None:
        pass  # no other process waits for its plans

    def fetch(self, result):
        if isinstance(result, Stepped) and result.call is not None:
            self.calls.append(("fetch", result.call))  # when the host waited for that step
        return result

    def read_adapter(self, name: str, path: str) -> str:
        return path

    def load_adapter(self, index: int, adapter: str) -> None:
        self.loaded[index] = adapter
