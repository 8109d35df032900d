"""Matching over normalised text: evasions, whitelist, masks on the original characters."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.moderation.lexicon import Action, Category, Lexicon, LexiconError, load_lexicon, parse_category
from services.moderation.matcher import Matcher
from services.moderation.settings import BUNDLED_LEXICON

LEXICON = Lexicon(
    categories=(
        Category("abuse", Action.MASK, ("傻逼", "fuck", "shit")),
        Category("fraud", Action.BLOCK, ("刷单返利", "fake invoice")),
        Category("contact", Action.REVIEW, ("加微信",)),
    ),
    whitelist=("shitake",),
)
MATCHER = Matcher(LEXICON)


def test_matcher_masks_exactly_the_original_characters() -> None:
    result = MATCHER.check("你这个傻逼客服")
    assert result.verdict is Action.MASK
    assert result.masked_text == "你这个**客服"


def test_matcher_catches_noise_between_characters_and_masks_it() -> None:
    result = MATCHER.check("well f.u.c.k that")
    assert result.masked_text == "well ******* that"
    assert MATCHER.check("傻 逼").masked_text == "***"
    assert MATCHER.check("傻\u200b逼").masked_text == "***"


def test_matcher_folds_full_width_and_case() -> None:
    result = MATCHER.check("ＦＵＣＫ off")
    assert result.masked_text == "**** off"
    assert [(h.start, h.end) for h in result.hits] == [(0, 4)]


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


def test_matcher_clean_text_is_allowed() -> None:
    result = MATCHER.check("请问这款茶叶有货吗？")
    assert result.verdict is Action.ALLOW and result.hits == ()


def test_lexicon_bundled_sample_loads_with_actions() -> None:
    lexicon = load_lexicon(BUNDLED_LEXICON)
    actions = {c.name: c.action for c in lexicon.categories}
    assert actions["abuse"] is Action.MASK and actions["fraud"] is Action.BLOCK
    assert "shitake" in lexicon.whitelist


def test_lexicon_unknown_action_names_the_file() -> None:
    with pytest.raises(LexiconError, match="spam.txt:1"):
        parse_category("spam", "# action: nuke\nword\n")


def test_lexicon_non_utf8_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe word")
    with pytest.raises(LexiconError, match="bad.txt"):
        load_lexicon(tmp_path)
