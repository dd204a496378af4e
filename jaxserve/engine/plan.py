"""A step's device work as plain data: what the scheduler decides and a runner executes, in this process or,
shipped, in every process of a group.

A step has two phases (as vLLM v1's SchedulerOutput, then its grammar bitmask before sampling):

    StepPlan    slots to release, prompt rows to prefill (with the page table), pages to copy, sequences to
                start (an insert sampling its first token from a row of this plan's prefill, or a resume),
                and the model's half of a decode step over the first max_slot + 1 slots
    SamplePlan  the grammar masks of the constrained slots, then the sampling half of that decode step

A plan refers to what earlier work left on the device by position, never by handle: an insert names its row
of the same plan's prefill, and a SamplePlan samples the logits of the StepPlan executed last.

`encode` turns a plan into a fixed set of named NumPy buffers: a header of counts, then payloads whose
leading dimension is the count rounded up to a power of two (so a receiver allocates from the header, and
the shapes stay few); `decode` reverses it. logit_bias travels as (token id, value) pairs, a resume's
generated tokens as one concatenated run. No jax here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.engine.types import SamplingParams


@dataclasses.dataclass(frozen=True)
class PrefillRow:
    slot: int  # the sequence's slot: its row of the page table
    tokens: list[int]  # a chunk of one prompt
    start: int  # the position of its first token
    targets: list[int]  # the token each position predicts (scored for echo), 0 past the prompt's end
    write_from: int = 0  # positions before this one are in shared (cached) pages already: not written
    adapter: int = 0  # the LoRA adapter it computes with (0: the base alone)


@dataclasses.dataclass(frozen=True)
class Start:
    """A sequence that starts decoding in `slot`: inserted (its first token sampled from row `logits_row` of
    the plan's prefill) or, with logits_row -1, resumed after a preemption (`token`, the last of
    `generated`, is the next step's input; sampling goes on as if never interrupted)."""

    slot: int
    params: SamplingParams
    position: int
    max_tokens: int
    stop_on_eos: bool
    mask: np.ndarray | None = None  # packed [ceil(V/32)] int32: the tokens it may pick until replaced; None: all
    logits_row: int = -1
    token: int = 0
    generated: tuple[int, ...] = ()
    adapter: int = 0  # the LoRA adapter it decodes with (0: the base alone)

    @property
    def inserts(self) -> bool:
        return self.logits_row >= 0


@dataclasses.dataclass(frozen=True)
class Decode:
    max_position: int  # the furthest position a decoding slot writes: bounds the attention window
    max_slot: int  # the last occupied slot: bounds the rows
    masks: bool = True  # its SamplePlan may carry masks (False: no constrained slot is open, it carries none)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    table: np.ndarray  # [slots, pages per sequence] the page table as of this plan (the pool's size: none)
    releases: tuple[int, ...] = ()  # executed first: a released slot may start again in the same plan
    prefill: tuple[PrefillRow, ...] = ()
    score: bool = False  # the prefill scores every position (echo)
    copies: tuple[tuple[int, int], ...] = ()  # (src, dst): after the prefill, before the starts
    starts: tuple[Start, ...] = ()
    decode: Decode | None = None  # last

    @property
    def empty(self) -> bool:
        return not (self.releases or self.prefill or self.copies or self.starts or self.decode)


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    slots: tuple[int, ...] = ()  # constrained slots whose next mask changed
    masks: tuple[np.ndarray, ...] = ()  # packed [ceil(V/32)] int32 each


def bucket(n: int) -> int:
    """The payload rows for n items: the next power of two (none for none: an empty part costs no bytes)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def _padded(rows, n: int, shape: tuple, dtype) -> np.ndarray:
    out = np.zeros((bucket(n), *shape), dtype)
    if n:
        out[:n] = rows
    return out


# a start's sampling knobs travel as a float64 row (exact for every float and for a 32-bit seed): each field
# of SamplingParams but logit_bias, whose pairs travel on their own, so a new knob needs nothing here
KNOBS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "logit_bias")
HEADER = ("releases", "rows", "tokens", "copies", "starts", "bias", "generated", "masks", "decode")


def encode(plan: StepPlan, words: int) -> dict[str, np.ndarray]:
    """The plan as named buffers (see the module's docstring); `words`: a mask's length, ceil(V/32)."""
    rows, starts = plan.prefill, plan.starts
    masked = [s for s in starts if s.mask is not None]
    bias = [pair for s in starts for pair in s.params.logit_bias]
    generated = [t for s in starts for t in s.generated]
    tokens = [t for r in rows for t in r.tokens]
    d = plan.decode
    header = np.array(
        [len(plan.releases), len(rows), len(tokens), len(plan.copies), len(starts), len(bias), len(generated)]
        + [len(masked), d is not None, -1 if d is None else d.max_position, -1 if d is None else d.max_slot]
        + [plan.score, d is not None and d.masks],
        np.int64,
    )
    mask_index = {id(s): i for i, s in enumerate(masked)}
    return {
        "header": header,
        "table": np.asarray(plan.table, np.int32),
        "releases": _padded(plan.releases, len(plan.releases), (), np.int32),
        "rows": _padded(
            [(r.slot, r.start, len(r.tokens), r.write_from, r.adapter) for r in rows], len(rows), (5,), np.int32
        ),
        "tokens": _padded(tokens, len(tokens), (), np.int32),
        "targets": _padded([t for r in rows for t in r.targets], len(tokens), (), np.int32),
        "copies": _padded(plan.copies, len(plan.copies), (2,), np.int32),
        "starts": _padded(
            [
                (s.slot, s.position, s.max_tokens, s.stop_on_eos, s.logits_row, s.token, mask_index.get(id(s), -1))
                + (len(s.params.logit_bias), len(s.generated), s.adapter)
                for s in starts
            ],
            len(starts),
            (10,),
            np.int64,
        ),
        "knobs": _padded(
            [[getattr(s.params, k) for k in KNOBS] for s in starts], len(starts), (len(KNOBS),), np.float64
        ),
        "bias_ids": _padded([t for t, _ in bias], len(bias), (), np.int32),
        "bias_values": _padded([v for _, v in bias], len(bias), (), np.float64),
        "generated": _padded(generated, len(generated), (), np.int32),
        "masks": _padded([s.mask for s in masked], len(masked), (words,), np.int32),
    }


def decode(buffers: dict[str, np.ndarray]) -> StepPlan:
    """The plan `encode` wrote."""
    h = dict(zip(HEADER, buffers["header"].tolist()))
    max_position, max_slot, score, masks = buffers["header"][len(HEADER) : len(HEADER) + 4].tolist()
    rows, at = [], 0
    for slot, start, length, write_from, adapter in buffers["rows"][: h["rows"]].tolist():
        piece = slice(at, at + length)
        tokens, targets = buffers["tokens"][piece].tolist(), buffers["targets"][piece].tolist()
        rows.append(PrefillRow(slot, tokens, start, targets, write_from, adapter))
        at += length
    starts, bias_at, gen_at = [], 0, 0
    knobs = buffers["knobs"][: h["starts"]].tolist()
    kinds = {k: type(getattr(SamplingParams(), k)) for k in KNOBS}  # float, or int (the seed)
    for fields, values in zip(buffers["starts"][: h["starts"]].tolist(), knobs):
        slot, position, max_tokens, stop_on_eos, logits_row, token, mask_row, n_bias, n_gen, adapter = fields
        bias = slice(bias_at, bias_at + n_bias)
        pairs = tuple(zip(buffers["bias_ids"][bias].tolist(), buffers["bias_values"][bias].tolist()))
        params = SamplingParams(logit_bias=pairs, **{k: kinds[k](v) for k, v in zip(KNOBS, values)})
        generated = tuple(buffers["generated"][gen_at : gen_at + n_gen].tolist())
        mask = None if mask_row < 0 else buffers["masks"][mask_row]
        starts.append(
            Start(slot, params, position, max_tokens, bool(stop_on_eos), mask, logits_row, token, generated, adapter)
        )
        bias_at, gen_at = bias_at + n_bias, gen_at + n_gen
    return StepPlan(
        table=buffers["table"],
        releases=tuple(buffers["releases"][: h["releases"]].tolist()),
        prefill=tuple(rows),
        score=bool(score),
        copies=tuple(map(tuple, buffers["copies"][: h["copies"]].tolist())),
        starts=tuple(starts),
        decode=Decode(max_position, max_slot, bool(masks)) if h["decode"] else None,
    )


def encode_sample(plan: SamplePlan, words: int) -> dict[str, np.ndarray]:
    n = len(plan.slots)
    return {
        "header": np.array([n], np.int64),
        "slots": _padded(plan.slots, n, (), np.int32),
        "masks": _padded(plan.masks, n, (words,), np.int32),
    }


def decode_sample(buffers: dict[str, np.ndarray]) -> SamplePlan:
    n = int(buffers["header"][0])
    return SamplePlan(tuple(buffers["slots"][:n].tolist()), tuple(buffers["masks"][:n]))
