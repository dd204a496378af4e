"""SmolLM2 against tests/reference: outputs of HF transformers (float32) on the same GGUF, compared with
what the engine serves (scheduler, jitted prefill and decode steps), all six prompts batched together."""

import threading

import numpy as np
import pytest

from jaxserve.device.build import build_engine
from jaxserve.engine.bridge import complete
from jaxserve.engine.types import EngineRequest, SamplingParams


@pytest.fixture(scope="module")
def served(smollm2, reference):
    """Each reference prompt echoed and decoded greedily for 32 tokens, concurrently: {i: (deltas, usage)}."""
    engine = build_engine(smollm2, slots=8, max_context=256, warmup=False)
    results = {}

    def run(i, p):
        req = EngineRequest(
            f"p{i}",
            tuple(p["prompt_ids"]),
            max_tokens=32,
            sampling=SamplingParams(temperature=0.0),
            echo=True,
            ignore_eos=True,
        )
        results[i] = complete(engine, req, timeout=600)

    try:
        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(reference["prompts"])]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        engine.shutdown()
    return results


def generated(deltas):
    return [t for d in deltas if not d.echo for t in d.tokens]


def test_tokenizer_matches_reference(smollm2, reference):
    for p in reference["prompts"]:
        assert smollm2.tokenizer.encode(p["prompt"]) == p["prompt_ids"]
        assert smollm2.tokenizer.decode(p["greedy_ids"]) == p["greedy_text"]


def test_greedy_tokens_and_logprobs_match_reference(served, reference):
    exact = 0
    for i, p in enumerate(reference["prompts"]):
        deltas, usage = served[i]
        tokens = generated(deltas)
        assert usage.completion_tokens == 32 and len(tokens) == 32
        agree = 0
        while agree < 32 and tokens[agree].token_id == p["greedy_ids"][agree]:
            agree += 1
        exact += agree == 32
        # logprobs are comparable while both follow the same path
        np.testing.assert_allclose([t.logprob for t in tokens[:agree]], p["greedy_logprobs"][:agree], atol=2e-3)
    assert exact >= 5, f"only {exact} of 6 prompts matched all 32 greedy tokens"


def test_echo_logprobs_match_reference(served, reference):
    for i, p in enumerate(reference["prompts"]):
        echo = served[i][0][0]
        assert echo.echo and echo.text == p["prompt"]
        assert echo.tokens[0].logprob is None and p["prompt_logprobs_echo"][0] is None
        np.testing.assert_allclose([t.logprob for t in echo.tokens[1:]], p["prompt_logprobs_echo"][1:], atol=2e-3)


def test_top5_match_reference(served, reference):
    p = reference["prompts"][0]
    tokens = generated(served[0][0])
    for step, top5 in enumerate(p["top5_first8"]):
        got_ids, got_lps = zip(*tokens[step].top[:5])
        assert list(got_ids) == [int(i) for i, _ in top5]
        np.testing.assert_allclose(got_lps, [lp for _, lp in top5], atol=2e-3)
