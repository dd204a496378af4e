"""Host-side text of one choice: incremental detokenizing and stop-string matching with a hold-back.

Text that could still grow into a stop string (or is half a UTF-8 character) is held back, so no delta
ever contains part of a stop string that later completes.
"""

from __future__ import annotations

from jaxserve.engine.types import RequestError
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """New text in -> (text safe to emit, whether a stop string was hit). After a hit, stop feeding."""
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            cut = min(i for i, _ in hits)
            self._held = ""
            return buf[:cut], True
        keep = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of some stop string
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class ChoiceText:
    """Token ids in, safe text deltas out."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stops)
        self.stopped = False

    def add(self, token_id: int) -> str:
        text, self.stopped = self._stops.feed(self._detok.add(token_id))
        return text

    def finish(self) -> str:
        """Text still held back when the choice ends for another reason (EOS, length)."""
        if self.stopped:
            return ""
        text, self.stopped = self._stops.feed(self._detok.flush())
        return text if self.stopped else text + self._stops.flush()


FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def fill_in_the_middle(tokenizer: Tokenizer, prefix_ids: list[int], suffix_ids: list[int]) -> list[int]:
    """The prompt for `suffix` (prefix-suffix-middle order, as StarCoder-family models are trained):
    <fim_prefix> prefix <fim_suffix> suffix <fim_middle>. A model without these tokens cannot do it."""
    ids = [tokenizer.token_id(name) for name in FIM_TOKENS]
    if None in ids:
        raise RequestError(
            "this model has no fill-in-the-middle tokens (" + ", ".join(FIM_TOKENS) + "), so `suffix` is not supported",
            "suffix",
        )
    fim_prefix, fim_suffix, fim_middle = ids
    return [fim_prefix, *prefix_ids, fim_suffix, *suffix_ids, fim_middle]
