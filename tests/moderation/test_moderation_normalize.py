"""Normalisation: NFKC, case folding, traditional -> simplified, noise removal, the way back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.lexicon import normalize as normalize_module
from services.common.lexicon.normalize import fold_char, normalize, normalize_word


def test_normalize_folds_full_width_case_and_traditional() -> None:
    assert normalize_word("ＦＵＣＫ") == "fuck"
    assert normalize_word("Hello") == "hello"
    assert normalize_word("刷單返利") == "刷单返利"
    assert normalize_word("網絡賭博") == "网络赌博"


def test_normalize_traditional_is_folded_per_character() -> None:
    # Phrase-level t2s keeps 乾隆 but turns 乾燥 into 干燥; per character both sides fold
    # the same way whatever their neighbours, which streams need.
    assert normalize_word("乾隆") == "干隆" and normalize_word("乾燥") == "干燥"


def test_normalize_drops_noise_punctuation_spaces_format_characters_and_emoji() -> None:
    assert normalize_word("f.u.c.k") == "fuck"
    assert normalize_word("刷 单\u3000返\t利") == "刷单返利"
    assert normalize_word("刷\u200b单\u200d返\ufeff利") == "刷单返利"
    assert normalize_word("刷🙂单👍🏽返❤️利") == "刷单返利"
    assert normalize_word("刷*单_返-利") == "刷单返利"


def test_normalize_maps_every_character_back_to_its_source() -> None:
    norm = normalize("退貨 Ｆ.u\u200bß🙂㍻")
    assert norm.text == "退货fuss平成"
    assert [norm.source_index(i) for i in range(len(norm.text))] == [0, 1, 3, 5, 7, 7, 9, 9]


def test_normalize_beyond_the_table_limit_gives_the_same_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(normalize_module, "TABLE_LIMIT", 0)
    text = "Ⓕ𝐔ｃｋ 𠀀 \U000e0041 刷單"  # characters no earlier test put in the table
    norm = normalize(text)
    assert norm.text == "".join(map(fold_char, text)) == "fuck𠀀刷单"
    assert norm.source_index(4) == text.index("𠀀")


@given(st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_normalize_is_the_concatenation_of_folded_characters(text: str) -> None:
    norm = normalize(text)
    assert norm.text == "".join(fold_char(c) for c in text)
    for index in range(len(norm.text)):
        source = norm.source_index(index)
        before = len("".join(fold_char(c) for c in text[:source]))
        assert before <= index < before + len(fold_char(text[source]))
    assert normalize_word(norm.text) == norm.text
