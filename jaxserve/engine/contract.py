"""The device contract of continuous batching (JetStream's prefill -> insert -> generate, with the prefill
writing straight into its sequence's pages, and generate in two halves, forward -> sample, so the host can
write a grammar's mask between them): everything the scheduler may ask of the device side, as a type.

The KV cache is a pool of `pages` pages of `page_size` positions. The caller decides which pages hold
which sequence: its page table, a host array [slots, pages_per_seq] of page ids (`pages` where none),
row s for the sequence in slot s, passed with every prefill and step.

`core.JaxCore` implements it with the jitted steps; the scheduler tests' fake core implements it with
arithmetic a reader can check by hand. Calls return at once (device arrays, no host sync); `fetch`
turns an output into host arrays. No jax here: the contract is plain Python.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

from jaxserve.engine.types import SamplingParams

T = TypeVar("T")


class PrefillRow(NamedTuple):
    slot: int  # the sequence's slot: its row of the page table
    tokens: list[int]  # a chunk of one prompt
    start: int  # the position of its first token
    targets: list[int]  # the token each position predicts (scored for echo), 0 past the prompt's end
    write_from: int = 0  # positions before this one are in shared (cached) pages already: not written
    adapter: int = 0  # the LoRA adapter it computes with (0: the base alone)


class PrefillResult(Protocol):
    logprobs: Any  # [P, T] log p(targets) per position (zero unless scored)
    top_ids: Any  # [P, T, K] (K = types.TOP_LOGPROBS)
    top_logprobs: Any  # [P, T, K] (K = types.TOP_LOGPROBS)
    last_logits: Any  # [P, V] at each row's last real token


class StepResult(Protocol):
    tokens: Any  # [B] (insert: [1])
    logprobs: Any  # [B] the chosen token's logprob
    top_ids: Any  # [B, K]
    top_logprobs: Any  # [B, K]
    done: Any  # [B] the sequence ended with this token (EOS or max_tokens): the slot stopped on device
    valid: Any  # [B] the slot was decoding: the row is a real token


@runtime_checkable
class Core(Protocol):
    slots: int  # B: sequences decoded at once
    cache_len: int  # positions per sequence
    pages: int  # pages in the KV pool
    page_size: int  # positions per page
    pages_per_seq: int  # columns of a page table
    chunk: int  # the most prompt tokens one prefill row takes
    eos_ids: tuple[int, ...]  # every id that ends a generation (empty: none)
    vocab_size: int  # V: a grammar mask row is ceil(V/32) int32 words
    max_loras: int  # LoRA adapters resident at once, indices 1..max_loras (0: none served)

    def packing(self, count: int, longest: int) -> tuple[int, int] | None:
        """The packed prefill shape (rows, tokens) for `count` whole prompts of at most `longest`
        tokens, or None if they do not fit one call."""

    def prefill(self, rows: list[PrefillRow], table: Any, score: bool = False) -> PrefillResult:
        """Prefill one chunk, or several whole prompts packed (start 0), into the pages `table` gives
        their slots. Output rows follow `rows`."""

    def copy_page(self, src: int, dst: int) -> None:
        """Page dst takes page src's contents (a choice's own copy of a shared partial page)."""

    def insert(
        self,
        slot: int,
        logits: Any,
        params: SamplingParams,
        position: int,
        max_tokens: int,
        stop_on_eos: bool,
        mask: Any | None = None,
        adapter: int = 0,
    ) -> StepResult:
        """Start decoding in `slot` with LoRA adapter `adapter` (0: none): sample the first token from the
        prompt's last logits, among the tokens `mask` allows (packed [ceil(V/32)] int32; None: all), which
        stays the slot's mask until replaced."""

    def resume(
        self,
        slot: int,
        token: int,
        params: SamplingParams,
        position: int,
        generated: list[int],
        max_tokens: int,
        stop_on_eos: bool,
        mask: Any | None = None,
        adapter: int = 0,
    ) -> None:
        """Continue a preempted sequence in `slot`, its cache refilled up to `position`: `token` (the last of
        `generated`, every token it has sampled) is the next step's input, sampling goes on from there as if
        never interrupted, `max_tokens` more at most."""

    def set_masks(self, slots: list[int], masks: list[Any]) -> None:
        """The tokens each slot's next step may pick (packed masks, as for insert)."""

    def forward(self, table: Any, max_position: int, max_slot: int) -> Any:
        """The first half of one decode step of every active slot (the model: each slot's next-token logits,
        left on the device), writing into the pages `table` gives it; `max_position` / `max_slot` bound the
        occupied ones."""

    def sample(self, logits: Any) -> StepResult:
        """The second half: each active slot's next token from `forward`'s logits, under the mask the slot
        has now (`set_masks` may come between the halves). Output rows cover at least the first max_slot + 1
        slots."""

    def step(self, table: Any, max_position: int, max_slot: int) -> StepResult:
        """One whole decode step, nothing in between."""
        return self.sample(self.forward(table, max_position, max_slot))

    def release(self, slot: int) -> None:
        """Stop decoding `slot` before the device would (stop string, abort)."""

    def fetch(self, result: T) -> T:
        """A step's or prefill's output as host arrays (waits for the device)."""

    def read_adapter(self, name: str, path: str) -> Any:
        """The LoRA adapter in directory `path`, read on the host and checked against the model (any thread);
        RequestError naming what is wrong."""

    def load_adapter(self, index: int, adapter: Any) -> None:
        """Make `adapter` (from read_adapter) LoRA adapter `index`, which no slot uses now (any thread)."""
