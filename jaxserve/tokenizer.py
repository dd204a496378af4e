"""Tokenizers behind one interface: byte-level BPE (HF `tokenizers`) and SentencePiece.

Every token maps to the exact bytes it contributes to the text (`token_bytes`), so streaming decodes
through an incremental UTF-8 decoder and never emits half of a multi-byte character.
"""

from __future__ import annotations

import codecs
import functools
import json
import shutil
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types that are whole special tokens


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for bytes, inverted: char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """The interface. Subclasses set vocab_size, bos_id, eos_id, add_bos and implement the methods."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def token_id(self, name: str) -> int | None:
        """Id of a token given by its exact vocabulary string (e.g. '<|im_end|>'), or None."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        raise NotImplementedError


class IncrementalDetokenizer:
    """Turns a token stream into text, holding back bytes of an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 family) on HF `tokenizers`, built from a GGUF vocabulary and merges."""

    FILE = "tokenizer.json"

    def __init__(self, hf: HFTokenizer, bos_id: int | None, eos_id: int | None, add_bos: bool):
        self._hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        byte_of = _byte_decoder()
        specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        self._bytes = []
        for i in range(self.vocab_size):
            piece = hf.id_to_token(i)
            if piece is None:
                self._bytes.append(b"")
            elif piece in specials or any(ch not in byte_of for ch in piece):
                self._bytes.append(piece.encode("utf-8"))
            else:
                self._bytes.append(bytes(byte_of[ch] for ch in piece))

    @classmethod
    def from_vocab(cls, tokens: list[str], token_types: list[int], merges: list[str], pre: str,
                   bos_id: int | None, eos_id: int | None, add_bos: bool) -> "BPETokenizer":
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":  # llama.cpp's SMOLLM pre-tokenizer: each digit apart, then GPT-2's regex
            hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            hf.pre_tokenizer = byte_level
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                               for tok, kind in zip(tokens, token_types) if kind in (_CONTROL, _USER_DEFINED)])
        tok = cls(hf, bos_id, eos_id, add_bos)
        return tok

    @classmethod
    def load(cls, directory: Path) -> "BPETokenizer":
        meta = json.loads((directory / "tokenizer_meta.json").read_text())
        return cls(HFTokenizer.from_file(str(directory / cls.FILE)), meta["bos_id"], meta["eos_id"], meta["add_bos"])

    def save(self, directory: Path) -> None:
        self._hf.save(str(directory / self.FILE))
        _save_meta(self, directory, "bpe")

    def encode(self, text: str) -> list[int]:
        ids = self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def token_id(self, name: str) -> int | None:
        return self._hf.token_to_id(name)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model`; byte-fallback pieces <0xNN> contribute their raw byte."""

    FILE = "tokenizer.model"

    def __init__(self, model_file: Path, add_bos: bool = False):
        self._path = Path(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.add_bos = add_bos
        self._bytes = []
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self._bytes.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                self._bytes.append(b"")
            else:
                self._bytes.append(piece.replace("\u2581", " ").encode("utf-8"))

    @classmethod
    def load(cls, directory: Path) -> "SentencePieceTokenizer":
        meta = json.loads((directory / "tokenizer_meta.json").read_text())
        return cls(directory / cls.FILE, add_bos=meta["add_bos"])

    def save(self, directory: Path) -> None:
        if self._path.resolve() != (directory / self.FILE).resolve():
            shutil.copyfile(self._path, directory / self.FILE)
        _save_meta(self, directory, "sentencepiece")

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self._sp.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def token_id(self, name: str) -> int | None:
        i = self._sp.piece_to_id(name)
        return None if self._sp.is_unknown(i) and name != self._sp.id_to_piece(i) else i


def _save_meta(tok: Tokenizer, directory: Path, kind: str) -> None:
    meta = {"kind": kind, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "add_bos": tok.add_bos}
    (directory / "tokenizer_meta.json").write_text(json.dumps(meta, indent=1))


def load_tokenizer(directory: Path) -> Tokenizer:
    directory = Path(directory)
    kind = json.loads((directory / "tokenizer_meta.json").read_text())["kind"]
    return {"bpe": BPETokenizer, "sentencepiece": SentencePieceTokenizer}[kind].load(directory)
