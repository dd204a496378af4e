"""Train the tiny test model: a SentencePiece tokenizer and a 4-layer Llama on scripts/data/corpus.txt.

    python scripts/train_tiny.py [--out checkpoints/tiny-llama] [--steps 600]

Writes a checkpoint folder (config, tokenizer.model, orbax params) that jaxserve loads as `tiny-llama`.
Deterministic for a given seed; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sentencepiece as spm
from tqdm import tqdm

from jaxserve.checkpoint import save_checkpoint
from jaxserve.model import KVCache, ModelConfig, Transformer, init_params
from jaxserve.tokenizer import SentencePieceTokenizer

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
CONFIG = ModelConfig(
    vocab_size=1024,
    dim=128,
    n_layers=4,
    n_heads=8,
    n_kv_heads=2,
    head_dim=16,
    mlp_dim=384,
    rope_theta=10000.0,
    max_context=512,
)


def train_tokenizer(text: str, directory: Path, vocab_size: int) -> SentencePieceTokenizer:
    corpus = directory / "corpus.txt"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    return SentencePieceTokenizer.from_file(directory / "tokenizer.model")


def train(cfg: ModelConfig, data: np.ndarray, steps: int, seq_len: int, batch: int, seed: int):
    model = Transformer(cfg)
    params = init_params(cfg, seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10, steps, 1e-4)
    opt = optax.adamw(schedule, weight_decay=0.01)
    opt_state = opt.init(params)
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))

    def loss_fn(params, x, y):
        cache, table = KVCache.per_row(cfg, batch, seq_len)
        logits, _ = model.apply(params, x, positions, cache, table, seq_len)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="training", unit="step")
    for _ in bar:
        starts = rng.integers(0, len(data) - seq_len - 1, batch)
        x = np.stack([data[s : s + seq_len] for s in starts])
        y = np.stack([data[s + 1 : s + seq_len + 1] for s in starts])
        params, opt_state, loss = step(params, opt_state, x, y)
        bar.set_postfix(loss=f"{float(loss):.3f}")
    return params, float(loss)


def sample(cfg: ModelConfig, params, tok: SentencePieceTokenizer, prompt: str, n: int) -> str:
    """Greedy continuation by full forward passes over one fixed-size buffer (no engine needed)."""
    ids = tok.encode(prompt)
    size = len(ids) + n
    cache, table = KVCache.per_row(cfg, 1, size)
    forward = jax.jit(lambda p, x: Transformer(cfg).apply(p, x, jnp.arange(size)[None], cache, table, size)[0])
    for i in range(len(ids), size):
        logits = forward(params, jnp.array([ids + [0] * (size - len(ids))]))
        ids.append(int(jnp.argmax(logits[0, i - 1])))
    return tok.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="checkpoints/tiny-llama")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    text = CORPUS.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(text, Path(tmp), CONFIG.vocab_size)
        data = np.array(tok.encode(text), np.int32)
        print(f"corpus: {len(text)} characters, {len(data)} tokens, vocab {tok.vocab_size}")
        params, loss = train(CONFIG, data, args.steps, args.seq_len, args.batch, args.seed)
        save_checkpoint(Path(args.out), CONFIG, params, tok)
    print(f"final loss {loss:.3f}; wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    for prompt in ("The Lord is my shepherd", "It was the best of times"):
        print("sample:", repr(sample(CONFIG, params, tok, prompt, 16)))


if __name__ == "__main__":
    main()
