"""SmolLM2 against ../shared/reference: outputs of HF transformers (float32) on the same GGUF."""

import jax
import numpy as np

from jaxserve.engine.steps import Forward


def greedy_with_logprobs(model, prompt_ids, steps):
    """Prefill the prompt, then decode greedily one token a step through the cache."""
    fw = Forward(model.cfg, model.mesh, model.param_shardings, slots=1, cache_len=64)
    n = len(prompt_ids)
    logits, cache = fw(model.params, np.array([prompt_ids]), np.arange(n)[None], fw.new_cache(), 64)
    logprobs = np.asarray(jax.nn.log_softmax(logits[0]))
    echo = [float(logprobs[j - 1, prompt_ids[j]]) for j in range(1, n)]
    last = logprobs[-1]
    tokens, chosen = [], []
    for i in range(steps):
        token = int(np.argmax(last))
        tokens.append(token)
        chosen.append(float(last[token]))
        logits, cache = fw(model.params, np.array([[token]]), np.array([[n + i]]), cache, 64)
        last = np.asarray(jax.nn.log_softmax(logits[0, 0]))
    return tokens, chosen, echo


def test_tokenizer_matches_reference(smollm2, reference):
    for p in reference["prompts"]:
        assert smollm2.tokenizer.encode(p["prompt"]) == p["prompt_ids"]
        assert smollm2.tokenizer.decode(p["greedy_ids"]) == p["greedy_text"]


def test_greedy_tokens_and_logprobs_match_reference(smollm2, reference):
    exact = 0
    for p in reference["prompts"]:
        tokens, chosen, echo = greedy_with_logprobs(smollm2, p["prompt_ids"], 32)
        agree = 0
        while agree < 32 and tokens[agree] == p["greedy_ids"][agree]:
            agree += 1
        exact += agree == 32
        # logprobs are comparable while both follow the same path
        np.testing.assert_allclose(chosen[:agree], p["greedy_logprobs"][:agree], atol=2e-3)
        np.testing.assert_allclose(echo, p["prompt_logprobs_echo"][1:], atol=2e-3)
        assert p["prompt_logprobs_echo"][0] is None
    assert exact >= 5, f"only {exact} of 6 prompts matched all 32 greedy tokens"


def test_top5_match_reference(smollm2, reference):
    p = reference["prompts"][0]
    fw = Forward(smollm2.cfg, smollm2.mesh, smollm2.param_shardings, slots=1, cache_len=64)
    ids = p["prompt_ids"] + p["greedy_ids"][:7]
    logits, _ = fw(smollm2.params, np.array([ids]), np.arange(len(ids))[None], fw.new_cache(), 64)
    logprobs = np.asarray(jax.nn.log_softmax(logits[0]))
    for step, top5 in enumerate(p["top5_first8"]):
        row = logprobs[len(p["prompt_ids"]) - 1 + step]
        ref_ids = [int(i) for i, _ in top5]
        assert list(np.argsort(-row)[:5]) == ref_ids
        np.testing.assert_allclose(row[ref_ids], [lp for _, lp in top5], atol=2e-3)
