"""SentencePiece rebuilt from Gemma 3's GGUF vocabulary against HF's tokenizer (reference/gemma3_reference.json)."""

import json
from pathlib import Path

import gguf
import pytest

from jaxserve.checkpoint.cards import find_card, gguf_path
from jaxserve.checkpoint.gguf_import import read_tokenizer
from jaxserve.tokenizer import IncrementalDetokenizer, SentencePieceTokenizer

REFERENCE = json.loads((Path(__file__).parent / "reference" / "gemma3_reference.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return read_tokenizer(gguf.GGUFReader(str(gguf_path(find_card("gemma-3-270m")))))


@pytest.mark.parametrize("case", REFERENCE["tokenize"], ids=lambda c: repr(c["text"][:16]))
def test_ids_match_hf(tok, case):
    assert tok.encode(case["text"]) == case["ids_with_bos"]
    assert tok.decode(case["ids_no_special"]) == case["text"]


def test_prompts_and_greedy_text_match_hf(tok):
    for p in REFERENCE["prompts"]:
        assert tok.encode(p["prompt"]) == p["prompt_ids"]
        assert tok.decode(p["greedy_ids"]) == p["greedy_text"]


def test_specials_and_round_trip_through_a_saved_file(tok, tmp_path):
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (2, 1, True)
    assert tok.token_id("<start_of_turn>") == 105
    tok.save(tmp_path)
    again = SentencePieceTokenizer.load(tmp_path)
    text = "<start_of_turn>user\n  naïve 🙂<end_of_turn>\n"
    assert again.encode(text) == tok.encode(text)
    detok = IncrementalDetokenizer(again)
    ids = again.encode(text)[1:]
    assert "".join(detok.add(i) for i in ids) + detok.flush() == text


def test_a_vocabulary_with_a_space_prefix_round_trips():
    """add_space_prefix (Llama 2 style): a '▁' goes before the text and decode drops it again."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(
        (Path(__file__).parent / "reference" / "hf-tiny" / "gemma3" / "tokenizer.model").read_bytes()
    )
    tok = SentencePieceTokenizer.from_vocab(
        [p.piece for p in proto.pieces],
        [p.score for p in proto.pieces],
        [p.type for p in proto.pieces],
        bos_id=2,
        eos_id=1,
        unk_id=3,
        pad_id=0,
        add_bos=False,
        add_space_prefix=True,
    )
    ids = tok.encode("the quick fox")
    assert tok.token_bytes(ids[0]).startswith(b" ")
    assert tok.decode(ids) == "the quick fox"
