"""The analyzer's terms (folding, segmentation, stemming, stop words) and the sentence splitter."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.llm_worker.knowledge.analysis import Analyzer, split_sentences

ANALYZER = Analyzer()


def test_analyzer_folds_traditional_chinese_to_simplified() -> None:
    assert ANALYZER.terms("退貨運費") == ANALYZER.terms("退货运费")
    assert "运费" in ANALYZER.terms("運費多少？")


def test_analyzer_segments_chinese_and_drops_stop_words_and_punctuation() -> None:
    terms = ANALYZER.terms("请问，我想退货怎么办？")
    assert "退货" in terms
    assert not {"请问", "我", "想", "怎么", "，", "？"} & set(terms)


def test_analyzer_stems_and_case_folds_english() -> None:
    assert ANALYZER.terms("Returns") == ANALYZER.terms("return")
    assert ANALYZER.terms("How much is SHIPPING?") == ["ship"]


def test_analyzer_normalizes_full_width_forms() -> None:
    assert ANALYZER.terms("ＩＰＨＯＮＥ　１５") == ANALYZER.terms("iphone 15")


def test_analyzer_search_mode_adds_sub_words_of_long_words() -> None:
    terms = ANALYZER.terms("中华人民共和国")
    assert "中华人民共和国" in terms and "共和国" in terms


def test_analyzer_keeps_numbers_and_mixed_text() -> None:
    terms = ANALYZER.terms("iPhone 15 Pro 退款")
    assert {"15", "pro", "退款"} <= set(terms)


def test_analyzer_gives_nothing_for_only_punctuation_and_emoji() -> None:
    assert ANALYZER.terms("？！…… 🙂🙂 ,.;") == []


@given(st.text(max_size=200))
def test_analyzer_never_fails_and_gives_no_blank_terms(text: str) -> None:
    assert all(term.strip() for term in ANALYZER.terms(text))


def test_split_sentences_chinese_ends() -> None:
    assert split_sentences("你好。我想退货！运费多少？好的……然后呢；最后") == [
        "你好。", "我想退货！", "运费多少？", "好的……", "然后呢；", "最后"]


def test_split_sentences_english_ends_but_not_decimals() -> None:
    assert split_sentences("It costs 3.5 dollars. Really? Yes!") == ["It costs 3.5 dollars.", "Really?", "Yes!"]


def test_split_sentences_keeps_closing_quotes_and_splits_lines() -> None:
    assert split_sentences("他说：“好的。”然后走了\n第二行") == ["他说：“好的。”", "然后走了", "第二行"]


@given(st.text(max_size=300))
def test_split_sentences_loses_no_text(text: str) -> None:
    joined = "".join(split_sentences(text))
    assert "".join(joined.split()) == "".join(text.split())
