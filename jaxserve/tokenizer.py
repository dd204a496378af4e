"""Tokenizers behind one interface: HF `tokenizers` (byte-level BPE, or a `tokenizer.json` of any kind) and
SentencePiece (a `.model` file, or one rebuilt from a GGUF's `llama` vocabulary).

Every token maps to the exact bytes it contributes to the text (`token_bytes`), so streaming decodes
through an incremental UTF-8 decoder and never emits half of a multi-byte character. Control tokens
written in the text (`<start_of_turn>`, `<|im_end|>`) encode to their one id, as HF's tokenizers and
llama.cpp do.
"""

from __future__ import annotations

import codecs
import functools
import json
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types, the same numbers as SentencePiece's piece types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


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
    eos_id: int | None  # the primary end-of-text id
    add_bos: bool
    extra_eos_ids: tuple[int, ...] = ()  # further ids that end a generation (generation_config.json's list)
    chat_template: str | None = None  # the model's Jinja chat template (GGUF metadata, HF tokenizer_config)
    special_ids: frozenset[int] = frozenset()  # control tokens: never produced by encoding plain text bytes

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation, the primary one first."""
        primary = () if self.eos_id is None else (self.eos_id,)
        return primary + tuple(i for i in self.extra_eos_ids if i != self.eos_id)

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


def _is_byte_level(hf: HFTokenizer) -> bool:
    """Whether the decoder maps GPT-2's printable alphabet back to bytes (else pieces are SentencePiece-style:
    '▁' for a space and <0xNN> byte-fallback pieces)."""
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
    return "ByteLevel" in kinds


class BPETokenizer(Tokenizer):
    """A tokenizer on HF `tokenizers`: byte-level BPE built from a GGUF vocabulary and merges, or any
    `tokenizer.json` of a Hugging Face checkpoint (byte-level or SentencePiece-style BPE)."""

    FILE = "tokenizer.json"

    def __init__(
        self,
        hf: HFTokenizer,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        extra_eos_ids: tuple[int, ...] = (),
    ):
        self._hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.extra_eos_ids = tuple(extra_eos_ids)
        byte_level = _is_byte_level(hf)
        byte_of = _byte_decoder()
        added = hf.get_added_tokens_decoder()
        specials = {t.content for t in added.values() if t.special}
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._bytes = []
        for i in range(self.vocab_size):
            piece = hf.id_to_token(i)
            if piece is None:
                self._bytes.append(b"")
            elif piece in specials:
                self._bytes.append(piece.encode("utf-8"))
            elif not byte_level:
                self._bytes.append(_piece_bytes(piece))
            elif any(ch not in byte_of for ch in piece):
                self._bytes.append(piece.encode("utf-8"))
            else:
                self._bytes.append(bytes(byte_of[ch] for ch in piece))

    @classmethod
    def from_vocab(
        cls,
        tokens: list[str],
        token_types: list[int],
        merges: list[str],
        pre: str,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
    ) -> BPETokenizer:
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":  # llama.cpp's SMOLLM pre-tokenizer: each digit apart, then GPT-2's regex
            hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            hf.pre_tokenizer = byte_level
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens(
            [
                AddedToken(tok, special=True, normalized=False)
                for tok, kind in zip(tokens, token_types)
                if kind in (_CONTROL, _USER_DEFINED)
            ]
        )
        tok = cls(hf, bos_id, eos_id, add_bos)
        return tok

    @classmethod
    def load(cls, directory: Path) -> BPETokenizer:
        meta = json.loads((directory / "tokenizer_meta.json").read_text())
        return cls(
            HFTokenizer.from_file(str(directory / cls.FILE)),
            meta["bos_id"],
            meta["eos_id"],
            meta["add_bos"],
            tuple(meta.get("eos_ids", ())),
        )

    @classmethod
    def from_file(cls, path: Path, bos: str | None, eos: str | None, add_bos: bool | None) -> BPETokenizer:
        """A Hugging Face `tokenizer.json`; BOS and EOS given by their token strings. `add_bos` None: add BOS
        exactly when the file's post-processor does."""
        hf = HFTokenizer.from_file(str(path))
        bos_id = None if bos is None else hf.token_to_id(bos)
        eos_id = None if eos is None else hf.token_to_id(eos)
        if add_bos is None:
            ids = hf.encode("", add_special_tokens=True).ids
            add_bos = bos_id is not None and ids[:1] == [bos_id]
        return cls(hf, bos_id, eos_id, bool(add_bos))

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


def _piece_bytes(piece: str) -> bytes:
    """What a SentencePiece-style piece contributes to the text: <0xNN> its byte, '▁' a space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (the serialized `.model` bytes); byte-fallback pieces <0xNN> contribute their
    raw byte. Control pieces written in the text are cut out first and encode to their own id (SentencePiece
    itself never matches them; HF's and llama.cpp's tokenizers do); decoded, they give their own text."""

    FILE = "tokenizer.model"

    def __init__(self, model_proto: bytes, add_bos: bool = False, extra_eos_ids: tuple[int, ...] = ()):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.add_bos = add_bos
        self.extra_eos_ids = tuple(extra_eos_ids)
        self._bytes = []
        self.special_ids = frozenset()
        self._controls: dict[str, int] = {}
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self._bytes.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_unknown(i) or not piece:
                self._bytes.append(b"")
            elif sp.is_control(i):  # its own text, as HF's decode and BPETokenizer give special tokens
                self.special_ids |= {i}
                self._bytes.append(piece.encode("utf-8"))
                self._controls[piece] = i
            else:
                self._bytes.append(piece.replace("\u2581", " ").encode("utf-8"))
        spec = pb.ModelProto.FromString(self._proto).normalizer_spec
        self._dummy_prefix = spec.add_dummy_prefix  # the '▁' put before the text, dropped again by decode
        self._control_lengths = sorted({len(p) for p in self._controls}, reverse=True)
        self._control_starts = {p[0] for p in self._controls}

    @classmethod
    def from_file(cls, path: Path, add_bos: bool = False) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes(), add_bos=add_bos)

    @classmethod
    def from_vocab(
        cls,
        tokens: list[str],
        scores: list[float],
        token_types: list[int],
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None,
        pad_id: int | None,
        add_bos: bool,
        add_space_prefix: bool,
    ) -> SentencePieceTokenizer:
        """Rebuild the SentencePiece BPE model a GGUF `llama` vocabulary came from (pieces, scores, piece
        types; GGUF's token types are SentencePiece's). Byte fallback when the vocabulary has byte pieces;
        whitespace is escaped to '▁' and, unless `add_space_prefix`, no '▁' is put before the text."""
        proto = pb.ModelProto()
        for piece, score, kind in zip(tokens, scores, token_types):
            if kind == _USER_DEFINED:  # llama.cpp's converter wrote their '▁' as spaces (Gemma's "  " pieces)
                piece = piece.replace(" ", "\u2581")
            proto.pieces.add(piece=piece, score=float(score), type=int(kind))
        spec = proto.trainer_spec
        spec.model_type = pb.TrainerSpec.BPE
        spec.vocab_size = len(tokens)
        spec.byte_fallback = _BYTE in token_types
        for field, i in (("unk", unk_id), ("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
            setattr(spec, f"{field}_id", -1 if i is None else int(i))
            if i is not None:
                setattr(spec, f"{field}_piece", tokens[i])
        norm = proto.normalizer_spec
        norm.name = "identity"
        norm.add_dummy_prefix = bool(add_space_prefix)
        norm.remove_extra_whitespaces = False
        norm.escape_whitespaces = True
        return cls(proto.SerializeToString(), add_bos=add_bos)

    @classmethod
    def load(cls, directory: Path) -> SentencePieceTokenizer:
        meta = json.loads((directory / "tokenizer_meta.json").read_text())
        return cls(
            (directory / cls.FILE).read_bytes(), add_bos=meta["add_bos"], extra_eos_ids=tuple(meta.get("eos_ids", ()))
        )

    def save(self, directory: Path) -> None:
        (directory / self.FILE).write_bytes(self._proto)
        _save_meta(self, directory, "sentencepiece")

    def _split_controls(self, text: str):
        """(text, None) runs and (piece, id) for each control piece written in the text, longest match first."""
        start = i = 0
        while i < len(text):
            if text[i] in self._control_starts:
                found = next(
                    (text[i : i + n] for n in self._control_lengths if text[i : i + n] in self._controls), None
                )
                if found:
                    if start < i:
                        yield text[start:i], None
                    yield found, self._controls[found]
                    i = start = i + len(found)
                    continue
            i += 1
        if start < len(text):
            yield text[start:], None

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        for run, control in self._split_controls(text):
            ids.extend([control] if control is not None else self._sp.encode(run))
        return ids

    def decode(self, ids) -> str:
        text = b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")
        return text[1:] if self._dummy_prefix and text.startswith(" ") else text

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def token_id(self, name: str) -> int | None:
        i = self._sp.piece_to_id(name)
        return None if self._sp.is_unknown(i) and name != self._sp.id_to_piece(i) else i


CHAT_TEMPLATE = "chat_template.jinja"  # in a checkpoint folder: the model's chat template, when it has one


def _save_meta(tok: Tokenizer, directory: Path, kind: str) -> None:
    meta = {
        "kind": kind,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "eos_ids": list(tok.eos_ids),
        "add_bos": tok.add_bos,
    }
    (directory / "tokenizer_meta.json").write_text(json.dumps(meta, indent=1))
    if tok.chat_template:
        (directory / CHAT_TEMPLATE).write_text(tok.chat_template)


def load_tokenizer(directory: Path) -> Tokenizer:
    directory = Path(directory)
    kind = json.loads((directory / "tokenizer_meta.json").read_text())["kind"]
    tok = {"bpe": BPETokenizer, "sentencepiece": SentencePieceTokenizer}[kind].load(directory)
    if (directory / CHAT_TEMPLATE).is_file():
        tok.chat_template = (directory / CHAT_TEMPLATE).read_text()
    return tok
