"""llama.cpp's own fidelity on the SmolLM2 reference, the bar jaxserve's quantized activations are held to.

    python scripts/agreement_llama_server.py --llama-server PATH [--reference tests/reference/smollm2_reference.json]

Starts llama-server (built by ../shared/tools/build-llama-server.sh) on the model card's GGUF file, the very
file tests/reference was computed from (by HF transformers, its weights dequantized to float32), and scores
it teacher-forced as tests/test_quantize.py scores jaxserve: for each reference prompt and each position of
its greedy continuation, one request of the prompt and the continuation so far, `n_predict: 1` with
`n_probs`, its top token compared with the reference's greedy token and its logprob of that token with the
reference's. Prints the top-1 agreement and the mean |delta logprob| (over the positions where the token is
among the n_probs returned).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import httpx
from bench_serving import start_llama_server

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "reference" / "smollm2_reference.json"
TOP = 20  # logprobs asked for a position


def score(url: str, reference: dict) -> tuple[float, float, int]:
    """(top-1 agreement, mean |delta logprob|, positions) of the server at `url` on `reference`."""
    agree, diffs = [], []
    with httpx.Client(base_url=url, timeout=60) as http:
        for p in reference["prompts"]:
            ids, n = p["prompt_ids"] + p["greedy_ids"], len(p["prompt_ids"])
            for i, (want, want_lp) in enumerate(zip(p["greedy_ids"], p["greedy_logprobs"], strict=True)):
                body = {"prompt": ids[: n + i], "n_predict": 1, "n_probs": TOP, "temperature": 0, "cache_prompt": True}
                probs = http.post("/completion", json=body).raise_for_status().json()["completion_probabilities"][0]
                agree.append(probs["id"] == want)
                got = {c["id"]: c["logprob"] for c in probs["top_logprobs"]}
                if want in got:
                    diffs.append(abs(got[want] - want_lp))
    return statistics.mean(agree), statistics.mean(diffs), len(agree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="llama.cpp's llama-server binary")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the model card naming the GGUF file")
    args = parser.parse_args()
    reference = json.loads(args.reference.read_text())
    server = SimpleNamespace(llama_server=args.llama_server, model=args.model, max_tokens=64, llama_args="")
    proc, url = start_llama_server(server, slots=1)
    try:
        agreement, diff, positions = score(url, reference)
    finally:
        proc.terminate()
        proc.wait()
    where = f"{positions} positions of {args.reference.name}"
    print(f"llama-server on {reference['model_file']}, teacher-forced over {where}:")
    print(f"top-1 agreement {agreement:.4f}, mean |delta logprob| {diff:.4f}")


if __name__ == "__main__":
    main()
