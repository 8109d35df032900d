"""The streaming filter: split words are caught, and any split gives the one-shot result."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.moderation.lexicon import Action, Category, Lexicon
from services.moderation.matcher import Matcher
from services.moderation.stream_filter import StreamFilter

MATCHER = Matcher(Lexicon(
    categories=(Category("abuse", Action.MASK, ("傻逼", "fuck", "shit", "ab", "bcd")),
                Category("fraud", Action.BLOCK, ("刷单返利",))),
    whitelist=("shitake",),
))


def run_stream(pieces: list[str]) -> tuple[str, bool]:
    stream = StreamFilter(MATCHER)
    out = []
    for index, piece in enumerate(pieces):
        step = stream.feed(piece, final=index == len(pieces) - 1)
        if step.blocked:
            return "".join(out), True
        out.append(step.safe_text)
    return "".join(out), False


def test_stream_word_split_across_deltas_is_masked() -> None:
    assert run_stream(["你这个傻", "逼客服", ""]) == ("你这个**客服", False)


def test_stream_holds_back_only_a_possible_word_start() -> None:
    stream = StreamFilter(MATCHER)
    assert stream.feed("hello sh").safe_text == "hello "
    assert stream.held_chars == 2


def test_stream_block_word_ends_stream_without_releasing_it() -> None:
    released, blocked = run_stream(["欢迎光临，", "刷单", "返利", "赚钱", ""])
    assert blocked and "刷" not in released and released == "欢迎光临，"


alphabet = st.sampled_from(list("傻逼刷单返利fuckshitakebcd .*\u200b好"))


@given(text=st.text(alphabet=alphabet, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8))
@settings(max_examples=400, deadline=None)
def test_stream_any_split_equals_one_shot(text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])] + [""]
    one_shot = MATCHER.check(text)
    released, blocked = run_stream(pieces)
    assert blocked == (one_shot.verdict is Action.BLOCK)
    if not blocked:
        assert released == one_shot.masked_text
    else:
        first_block = min(h.start for h in one_shot.hits if h.action is Action.BLOCK)
        assert len(released) <= first_block
