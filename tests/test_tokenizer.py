"""Both tokenizer kinds: round-trips, special tokens by name, and UTF-8-safe incremental decoding."""

import pytest

from jaxserve.tokenizer import IncrementalDetokenizer, load_tokenizer

TEXTS = [
    "The capital of France is",
    "  two spaces, tabs\tand\nnewlines",
    "naïve café — 日本語のテキスト 🙂🚀",
    "digits 1234567890 and symbols {}[]<>",
]


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tokenizer(request, smollm2_dir, tiny_dir):
    return load_tokenizer(smollm2_dir if request.param == "smollm2" else tiny_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_splits_a_character(tokenizer, text):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in tokenizer.encode(text)] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_emoji_split_across_byte_tokens_is_held_back(tiny_dir):
    """The tiny model's vocabulary has no emoji: 🙂 becomes four byte-fallback tokens."""
    tok = load_tokenizer(tiny_dir)
    ids = tok.encode("🙂")
    assert len(ids) == 4
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["", "", "", "🙂"]


def test_special_tokens_by_name(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert tok.token_id("<|im_end|>") == 2 == tok.eos_id
    assert tok.token_id("<|endoftext|>") == 0
    assert tok.token_id("no such token") is None
    assert tok.encode("<|im_start|>user") == [1, 4093]  # a special token is one id, never split
    assert tok.decode([1, 4093, 2]) == "<|im_start|>user<|im_end|>"
    assert not tok.add_bos


def test_sentencepiece_specials(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    assert tok.eos_id == 2 and tok.bos_id == 1
    assert tok.token_id("</s>") == 2
    assert tok.token_id("no such piece") is None
