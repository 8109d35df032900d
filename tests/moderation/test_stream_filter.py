"""The streaming filter: split words are caught, and any split gives the one-shot result."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.lexicon import stream_filter
from services.common.lexicon.matcher import Hit, Matcher
from services.common.lexicon.model import Action, Category, Lexicon
from services.common.lexicon.normalize import Normalized, normalize
from services.common.lexicon.stream_filter import StreamFilter

MATCHER = Matcher(Lexicon(
    categories=(Category("abuse", Action.MASK, ("傻逼", "fuck", "shit", "ab", "bcd", "strasse", "利息")),
                Category("fraud", Action.BLOCK, ("刷单返利",)),
                Category("contact", Action.REVIEW, ("加微信",))),
    whitelist=("shitake", "禁止刷单", "刷单返利券"),
))


def run_stream(pieces: list[str]) -> tuple[str, bool]:
    released, blocked, _ = run_stream_with_hits(pieces)
    return released, blocked


def run_stream_with_hits(pieces: list[str]) -> tuple[str, bool, list[Hit]]:
    stream = StreamFilter(MATCHER)
    out: list[str] = []
    hits: list[Hit] = []
    for index, piece in enumerate(pieces):
        step = stream.feed(piece, final=index == len(pieces) - 1)
        if step.blocked:
            return "".join(out), True, [*hits, step.blocked]
        out.append(step.safe_text)
        hits.extend(step.hits)
    return "".join(out), False, hits


def test_stream_word_split_across_deltas_is_masked() -> None:
    assert run_stream(["你这个傻", "逼客服", ""]) == ("你这个**客服", False)


def test_stream_holds_back_only_a_possible_word_start() -> None:
    stream = StreamFilter(MATCHER)
    assert stream.feed("hello sh").safe_text == "hello "
    assert stream.held_chars == 2


def test_stream_block_word_ends_stream_without_releasing_it() -> None:
    released, blocked = run_stream(["欢迎光临，", "刷单", "返利", "赚钱", ""])
    assert blocked and "刷" not in released and released == "欢迎光临，"


def test_stream_split_word_with_noise_traditional_and_full_width_is_masked() -> None:
    assert run_stream(["你这个傻", "*", "逼", "客服", ""]) == ("你这个***客服", False)
    assert run_stream(["ｆ.", "Ｕ.", "c\u200b", "K!", ""]) == ("*******!", False)
    assert run_stream(["來刷", "單", "返", "利", ""]) == ("來", True)


def test_stream_whitelisted_phrase_split_across_deltas_passes() -> None:
    assert run_stream(["shit", "ake", " soup", ""]) == ("shitake soup", False)
    assert run_stream(["shit", " soup", ""]) == ("**** soup", False)


def test_stream_releases_as_soon_as_no_word_can_complete() -> None:
    stream = StreamFilter(MATCHER)
    assert stream.feed("你好，").safe_text == "你好，"
    assert stream.feed("傻").safe_text == "" and stream.held_chars == 1
    assert stream.feed("瓜").safe_text == "傻瓜" and stream.held_chars == 0


def test_stream_hits_positions_are_relative_to_the_whole_stream() -> None:
    stream = StreamFilter(MATCHER)
    stream.feed("一二三")
    step = stream.feed("傻逼啊")
    assert step.safe_text == "**啊" and [(h.start, h.end) for h in step.hits] == [(3, 5)]


# Traditional, full-width, expanding (ß), noise and emoji characters beside the plain ones;
# fragments of the words and phrases too, so that whole ones (and overlaps) come up often.
alphabet = st.sampled_from(list("傻逼刷单單返利息券禁止加微信fuckshitakebcdｆＵß .*\u200b\u3000🙂好"))
fragments = st.sampled_from(["刷单", "刷單", "返利", "息", "券", "禁止", "傻", "逼", "加微", "信", "sh", "it", "ake",
                             "ＦＵ", "ck", "stra", "ße", "ab", "cd", " ", "*", "\u200b", "🙂"])
texts = st.one_of(st.text(alphabet=alphabet, max_size=40), st.lists(fragments, max_size=16).map("".join))


@given(text=texts, cuts=st.lists(st.integers(0, 40), max_size=8))
@settings(max_examples=600, deadline=None)
def test_stream_any_split_equals_one_shot(text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)] + [""]
    one_shot = MATCHER.check(text)
    released, blocked, hits = run_stream_with_hits(pieces)
    assert blocked == (one_shot.verdict is Action.BLOCK)
    if not blocked:
        assert released == one_shot.masked_text
        assert sorted(hits, key=repr) == sorted(one_shot.hits, key=repr)
    else:
        first_block = min(h.start for h in one_shot.hits if h.action is Action.BLOCK)
        assert len(released) <= first_block


def test_stream_held_noise_is_not_normalised_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # "f", then pages of noise: all of it is held (f...u...c...k is still a word), but each
    # delta is normalised once, so a stream costs linear time, not quadratic.
    normalised: list[int] = []

    def counting(text: str) -> Normalized:
        normalised.append(len(text))
        return normalize(text)

    monkeypatch.setattr(stream_filter, "normalize", counting)
    pieces = ["f", *([". 🙂 "] * 2000), "uck!", ""]
    released, blocked = run_stream(pieces)
    assert not blocked and released == "*" * (len("".join(pieces)) - 1) + "!"
    assert sum(normalised) == len("".join(pieces))


def test_stream_block_word_overlapping_a_possible_word_blocks_at_once() -> None:
    matcher = Matcher(Lexicon((Category("fraud", Action.BLOCK, ("赌博",)), Category("x", Action.MASK, ("博彩",))), ()))
    stream = StreamFilter(matcher)
    assert stream.feed("欢迎").safe_text == "欢迎"
    step = stream.feed("赌博")  # 博 could still start 博彩, but 赌博 is complete and final
    assert step.blocked is not None and (step.blocked.start, step.blocked.end) == (2, 4)
