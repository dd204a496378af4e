"""Gemma 3 270M (GGUF, float32 weights) against HF transformers' float32 outputs in
tests/reference/gemma3_reference.json, through the served steps (JaxRunner): greedy tokens, their logprobs,
echo logprobs, and the cached decode path past the 512-token sliding window."""

import json
from pathlib import Path

import numpy as np
import pytest
from served import greedy_decode, own_pages, scored_prefill, targets

from jaxserve.checkpoint import ensure_checkpoint, load_checkpoint
from jaxserve.device.runner import JaxRunner
from jaxserve.engine.plan import PrefillRow
from jaxserve.sharding import make_mesh

REFERENCE = json.loads((Path(__file__).parent / "reference" / "gemma3_reference.json").read_text())
W = 640  # positions per slot: the longest prompt (603) + 32 greedy tokens


@pytest.fixture(scope="module")
def gemma(checkpoint_root):
    return load_checkpoint(ensure_checkpoint("gemma-3-270m", checkpoint_root, progress=False), make_mesh(1, 1))


@pytest.fixture(scope="module")
def core(gemma):
    return JaxRunner(gemma, slots=1, cache_len=W, eos_id=None)


def test_config(gemma):
    c = gemma.cfg
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (18, 640, 4, 1, 256, 262144)
    assert c.sliding_window == 512 and [i for i in range(18) if i not in c.local_layers] == [5, 11, 17]
    assert (c.rope_theta, c.rope_local_theta) == (1e6, 1e4)


@pytest.mark.parametrize("p", REFERENCE["prompts"], ids=lambda p: f"{len(p['prompt_ids'])}-tokens")
def test_teacher_forced_greedy_and_logprobs(core, p):
    """The scored prefill of prompt + the reference's greedy tokens (in 256-token chunks): at each step our
    top token is the reference's (so free-running greedy agrees for all 32 steps), with its logprob; and
    the prompt's echo."""
    n = len(p["prompt_ids"])
    lp, top_ids, *_ = scored_prefill(core, 0, p["prompt_ids"] + p["greedy_ids"], chunk=256)
    assert top_ids[n - 1 : -1, 0].tolist() == p["greedy_ids"]
    np.testing.assert_allclose(lp[n - 1 :], p["greedy_logprobs"], atol=1e-3)
    np.testing.assert_allclose(lp[: n - 1], p["prompt_logprobs_echo"][1:], atol=5e-3)
    assert p["prompt_logprobs_echo"][0] is None


def test_cached_decode_past_the_sliding_window(gemma, core):
    """Prefill the 603-token prompt in chunks, then 32 greedy decode steps through the cache."""
    p = max(REFERENCE["prompts"], key=lambda p: len(p["prompt_ids"]))
    assert len(p["prompt_ids"]) > gemma.cfg.sliding_window
    [(tokens, logprobs, *_)] = greedy_decode(core, [p["prompt_ids"]], 32, chunk=256)
    assert tokens.tolist() == p["greedy_ids"]
    np.testing.assert_allclose(logprobs, p["greedy_logprobs"], atol=1e-3)


def test_tokenizer_from_the_checkpoint(gemma):
    assert gemma.tokenizer.encode(REFERENCE["prompts"][0]["prompt"]) == REFERENCE["prompts"][0]["prompt_ids"]
    assert gemma.tokenizer.eos_id == 1


def test_int8_keeps_the_greedy_tokens(checkpoint_root):
    """--quantize int8 works for Gemma 3: teacher-forced, its argmax is the reference's token at >= 95% of
    the 192 steps."""
    model = load_checkpoint(
        ensure_checkpoint("gemma-3-270m", checkpoint_root, progress=False, quantize="int8"), make_mesh(1, 1)
    )
    core = JaxRunner(model, slots=1, cache_len=W, eos_id=None)
    agree = 0
    for p in REFERENCE["prompts"]:
        # the prompt but its last token prefilled unscored (every position's logits over Gemma's 262k
        # vocabulary would be most of the work), then the rest scored: the top id after each of its tokens
        n, prompt = len(p["prompt_ids"]), p["prompt_ids"]
        for start in range(0, n - 1, 256):
            chunk = prompt[start : min(start + 256, n - 1)]
            core.fetch(core.prefill([PrefillRow(0, chunk, start, [0] * len(chunk))], own_pages(core)))
        rest = prompt[n - 1 :] + p["greedy_ids"]
        out = core.fetch(core.prefill([PrefillRow(0, rest, n - 1, targets(rest))], own_pages(core), score=True))
        agree += int((out.top_ids[0, : len(p["greedy_ids"]), 0] == p["greedy_ids"]).sum())
    assert agree >= 0.95 * 32 * len(REFERENCE["prompts"])
