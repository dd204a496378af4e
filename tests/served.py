"""The model run the way requests run it: through JaxRunner and the jitted steps of jaxserve.device.steps.
Also `full_logits`, one plain forward pass over a whole sequence, which those steps must agree with."""

import jax
import numpy as np

from jaxserve.device.runner import JaxRunner
from jaxserve.engine.plan import PrefillRow, Start
from jaxserve.engine.types import SamplingParams
from jaxserve.model import KVCache, Transformer

GREEDY = SamplingParams(temperature=0.0)


def full_logits(cfg, params, tokens, formulation=None) -> np.ndarray:
    """One forward pass of the model (under `formulation`, None: float32) over `tokens` from an empty cache:
    logits [T, V]."""
    n = len(tokens)
    model = Transformer(cfg) if formulation is None else Transformer(cfg, formulation)
    forward = jax.jit(lambda params, t, pos, cache, table: model.apply(params, t, pos, cache, table, n)[0])
    cache, table = KVCache.per_row(cfg, 1, n)
    return np.asarray(
        forward(params, np.array([tokens], np.int32), np.arange(n, dtype=np.int32)[None], cache, table)[0]
    )


def own_pages(core: JaxRunner) -> np.ndarray:
    """A page table giving each slot its own run of pages (a core whose pool holds every slot's context)."""
    return np.arange(core.slots * core.pages_per_seq, dtype=np.int32).reshape(core.slots, core.pages_per_seq)


def targets(tokens) -> list[int]:
    return list(tokens[1:]) + [0]


def scored_prefill(core: JaxRunner, slot: int, tokens, chunk: int | None = None):
    """Prefill `tokens` into `slot` in chunks with scoring -> (logprob of each next token [T-1], top ids
    [T, 5], top logprobs [T, 5], the last position's logits [V]), as host arrays."""
    chunk = chunk or len(tokens)
    lp, ids, top = [], [], []
    for start in range(0, len(tokens), chunk):
        piece = list(tokens[start : start + chunk])
        out = core.fetch(
            core.prefill(
                [PrefillRow(slot, piece, start, targets(tokens)[start : start + len(piece)])],
                own_pages(core),
                score=True,
            )
        )
        lp.append(out.logprobs[0, : len(piece)])
        ids.append(out.top_ids[0, : len(piece)])
        top.append(out.top_logprobs[0, : len(piece)])
    return np.concatenate(lp)[:-1], np.concatenate(ids), np.concatenate(top), out.last_logits[0]


def greedy_decode(core: JaxRunner, prompts, steps: int, chunk: int | None = None):
    """Prefill each prompt into its own slot, then decode greedily one token a step for all of them at
    once -> per prompt (tokens, logprobs, top ids, top logprobs), host arrays of `steps` rows."""
    outs = []
    for slot, prompt in enumerate(prompts):
        *_, last = scored_prefill(core, slot, prompt, chunk)
        outs.append([core.fetch(core.insert(Start(slot, GREEDY, len(prompt), steps, False, logits_row=0), last))])
    for i in range(1, steps):
        out = core.fetch(
            core.sample(core.forward(own_pages(core), max(len(p) for p in prompts) + i - 1, len(prompts) - 1))
        )
        for slot in range(len(prompts)):
            outs[slot].append(jax.tree.map(lambda a, slot=slot: a[slot : slot + 1], out))
    return [
        tuple(np.concatenate([getattr(o, f) for o in seq]) for f in ("tokens", "logprobs", "top_ids", "top_logprobs"))
        for seq in outs
    ]


def assert_served_steps_equal_full_pass(model, served) -> None:
    """Two prompts prefilled in chunks of 3, then 8 greedy steps of two slots, through `served` (`model`
    under a formulation): the tokens and their logprobs are `model`'s float32 formulation's full pass."""
    prompts = [model.tokenizer.encode("Call me Ishmael."), model.tokenizer.encode("It was the best of")]
    core = JaxRunner(served, slots=2, cache_len=128, eos_id=None)
    for prompt, (tokens, lps, *_) in zip(prompts, greedy_decode(core, prompts, 8, chunk=3)):
        full = full_logits(model.cfg, model.params, prompt + list(tokens))[len(prompt) - 1 : -1]
        want = np.asarray(jax.nn.log_softmax(full.astype(np.float64), axis=-1))
        assert (tokens == want.argmax(-1)).all()
        np.testing.assert_allclose(lps, want[np.arange(8), tokens], atol=1e-4)
