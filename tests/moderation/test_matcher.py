"""Matching over normalised text: evasions, whitelist, masks on the original characters."""

from __future__ import annotations

import pytest

from services.common.lexicon.matcher import Matcher
from services.common.lexicon.model import Action, Category, Lexicon

LEXICON = Lexicon(
    categories=(
        Category("abuse", Action.MASK, ("傻逼", "fuck", "shit", "Straße")),
        Category("fraud", Action.BLOCK, ("刷单返利", "fake invoice", "網絡賭博")),
        Category("contact", Action.REVIEW, ("加微信",)),
        Category("gambling", Action.MASK, ("赌博",)),
    ),
    whitelist=("shitake", "禁止赌博"),
)
MATCHER = Matcher(LEXICON)


def spans(text: str) -> list[tuple[int, int, str]]:
    return [(h.start, h.end, h.category) for h in MATCHER.check(text).hits]


def test_matcher_masks_exactly_the_original_characters() -> None:
    result = MATCHER.check("你这个傻逼客服")
    assert result.verdict is Action.MASK
    assert result.masked_text == "你这个**客服"
    assert [(h.start, h.end, h.word) for h in result.hits] == [(3, 5, "傻逼")]


@pytest.mark.parametrize(("text", "masked"), [
    ("well f.u.c.k that", "well ******* that"),          # punctuation between letters
    ("well f u  c k that", "well ******** that"),        # spaces
    ("well f\u200bu\u200cc\u2060k that", "well ******* that"),  # zero-width characters
    ("well f🙂u👍🏽c❤️k that", "well ********* that"),     # emoji, modifiers, variation selectors
    ("你这个傻*逼", "你这个***"),                            # "法*轮" style, on a neutral word
    ("你这个傻\u3000逼", "你这个***"),                        # ideographic space
])
def test_matcher_skips_noise_between_characters_and_masks_it(text: str, masked: str) -> None:
    result = MATCHER.check(text)
    assert result.verdict is Action.MASK
    assert result.masked_text == masked


def test_matcher_noise_before_and_after_a_word_is_not_masked() -> None:
    assert MATCHER.check("…傻逼！").masked_text == "…**！"


def test_matcher_blocks_with_noise_between_characters() -> None:
    for text in ("来刷*单*返*利", "来 刷 单 返 利", "来刷🙂单\u200b返.利", "this is a fake-invoice", "FAKEINVOICE"):
        assert MATCHER.check(text).verdict is Action.BLOCK, text


def test_matcher_folds_full_width_and_case() -> None:
    result = MATCHER.check("ＦＵＣＫ off")
    assert result.masked_text == "**** off"
    assert [(h.start, h.end) for h in result.hits] == [(0, 4)]
    assert MATCHER.check("FuCk").masked_text == "****"


def test_matcher_folds_traditional_to_simplified_both_ways() -> None:
    assert MATCHER.check("來刷單返利吧").verdict is Action.BLOCK      # simplified word, traditional text
    assert MATCHER.check("网络赌博").verdict is Action.BLOCK           # traditional word, simplified text
    assert MATCHER.check("你這個傻逼").masked_text == "你這個**"


def test_matcher_masks_spans_on_original_text_with_mixed_widths() -> None:
    # Full-width letters, a wide emoji and an expansion (ß -> ss) ahead of and inside hits:
    # every span must still be in original code points.
    text = "ＡＢ🙂ｆ．Ｕ．ｃ．Ｋ，傻逼 STRASSE straße"
    result = MATCHER.check(text)
    assert result.masked_text == "ＡＢ🙂*******，** ******* ******"
    assert spans(text) == [(3, 10, "abuse"), (11, 13, "abuse"), (14, 21, "abuse"), (22, 28, "abuse")]
    assert [h.word for h in result.hits] == ["fuck", "傻逼", "strasse", "strasse"]


def test_matcher_overlapping_mask_hits_are_masked_once() -> None:
    matcher = Matcher(Lexicon((Category("x", Action.MASK, ("abc", "bcd", "c")),), ()))
    result = matcher.check("xabcdx")
    assert result.masked_text == "x****x"
    assert [(h.start, h.end) for h in result.hits] == [(1, 4), (2, 5), (3, 4)]


def test_matcher_block_beats_mask() -> None:
    result = MATCHER.check("傻逼，来刷单返利吧")
    assert result.verdict is Action.BLOCK
    assert {h.category for h in result.hits} == {"abuse", "fraud"}


def test_matcher_review_passes_text_unchanged() -> None:
    result = MATCHER.check("加微信聊")
    assert result.verdict is Action.REVIEW and result.masked_text == "加微信聊"


def test_matcher_whitelisted_phrase_is_not_a_hit() -> None:
    assert MATCHER.check("shitake mushrooms").verdict is Action.ALLOW
    assert MATCHER.check("shit, shitake").masked_text == "****, shitake"
    assert MATCHER.check("本店禁止赌博").verdict is Action.ALLOW


def test_matcher_whitelist_is_normalised_like_the_text() -> None:
    assert MATCHER.check("本店禁止賭博").verdict is Action.ALLOW          # traditional
    assert MATCHER.check("SHI-TAKE 蘑菇").verdict is Action.ALLOW         # case and noise
    assert MATCHER.check("赌博？禁止 赌博！").masked_text == "**？禁止 赌博！"  # only the covered one passes


def test_matcher_word_in_two_categories_is_two_hits() -> None:
    matcher = Matcher(Lexicon((Category("a", Action.MASK, ("词",)), Category("b", Action.REVIEW, ("詞",))), ()))
    result = matcher.check("一个词")
    assert result.verdict is Action.REVIEW and result.masked_text == "一个*"
    assert sorted(h.category for h in result.hits) == ["a", "b"]


def test_matcher_clean_text_is_allowed() -> None:
    result = MATCHER.check("请问这款茶叶有货吗？Do you ship to Hong Kong?")
    assert result.verdict is Action.ALLOW and result.hits == ()


def test_matcher_empty_lexicon_allows_everything() -> None:
    assert Matcher(Lexicon((), ("shitake",))).check("fuck").verdict is Action.ALLOW
