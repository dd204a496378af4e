"""Stop strings across token boundaries and UTF-8 safety of streamed text."""

from jaxserve.engine.text import ChoiceText, StopMatcher


def feed_all(matcher, pieces):
    out, hit = [], False
    for p in pieces:
        text, hit = matcher.feed(p)
        out.append(text)
        if hit:
            break
    return out, hit


def test_stop_split_across_pieces_is_never_emitted():
    out, hit = feed_all(StopMatcher(("\n\nThe",)), ["Paris.", "\n", "\n", "The answer"])
    assert hit and "".join(out) == "Paris."
    assert out == ["Paris.", "", "", ""]


def test_false_start_is_released():
    m = StopMatcher(("END",))
    assert m.feed("a E") == ("a ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("ENx", False)
    assert m.flush() == ""


def test_earliest_of_several_stops_wins():
    out, hit = feed_all(StopMatcher(("b", "abc")), ["xxab", "c"])
    assert hit and "".join(out) == "xxa"


def test_held_text_is_flushed_at_the_end():
    m = StopMatcher(("STOP",))
    assert m.feed("done ST") == ("done ", False)
    assert m.flush() == "ST"


class ByteTokenizer:
    """Each token is one byte: the worst case for multi-byte characters."""

    def token_bytes(self, token_id):
        return bytes([token_id])


def test_choice_text_streams_cjk_and_emoji_whole():
    text = "日本 🙂 ok"
    choice = ChoiceText(ByteTokenizer(), ("ok",))
    pieces = [choice.add(b) for b in text.encode()]
    assert choice.stopped
    assert "".join(pieces) == "日本 🙂 "
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["", "", "日"]


class FimTokenizer:
    names = {"<fim_prefix>": 900, "<fim_suffix>": 901, "<fim_middle>": 902}

    def token_id(self, name):
        return self.names.get(name)


def test_suffix_builds_a_fill_in_the_middle_prompt():
    from jaxserve.engine.text import fill_in_the_middle

    assert fill_in_the_middle(FimTokenizer(), [1, 2], [3]) == [900, 1, 2, 901, 3, 902]


def test_suffix_on_a_model_without_fim_tokens_is_a_clear_error(smollm2_dir):
    import pytest

    from jaxserve.engine.text import fill_in_the_middle
    from jaxserve.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match="no fill-in-the-middle tokens") as e:
        fill_in_the_middle(load_tokenizer(smollm2_dir), [1], [2])
    assert e.value.param == "suffix"
