"""Retrieval for a turn: answerable or not, and follow-ups resolved against the previous user turn."""

from __future__ import annotations

import pytest

from services.llm_worker.knowledge.retrieval import MIN_CONFIDENCE, is_follow_up, retrieve
from tests.knowledge.kb_corpus import shop_index

INDEX = shop_index()


@pytest.mark.parametrize(("question", "document_id"), [
    ("运费多少钱？", "faq"),
    ("How much is shipping?", "faq"),
    ("已经开封的茶叶能退货吗", "returns"),
    ("Can glass kettles go in the dishwasher?", "care"),
])
def test_retrieve_answers_what_the_documents_say(question: str, document_id: str) -> None:
    found = retrieve(INDEX, question)
    assert found.answerable and found.confidence >= MIN_CONFIDENCE
    assert found.hits[0].chunk.document_id == document_id
    assert found.query == question


@pytest.mark.parametrize("question", ["你们卖咖啡机吗？", "What is the capital of France?", "量子计算机的原理是什么",
                                      "？？？", ""])
def test_retrieve_does_not_guess_when_nothing_supports_an_answer(question: str) -> None:
    assert not retrieve(INDEX, question).answerable


def test_follow_up_is_resolved_against_the_previous_turn() -> None:
    alone = retrieve(INDEX, "那运费呢？")
    assert alone.hits[0].chunk.kind == "faq"
    found = retrieve(INDEX, "那运费呢？", previous_user_turns=["你好", "无理由退货怎么办？"])
    assert found.answerable
    assert found.hits[0].chunk.heading == "退换货政策 > 退货运费"
    assert found.query == "无理由退货怎么办？\n那运费呢？"


def test_english_follow_up_with_a_pronoun() -> None:
    found = retrieve(INDEX, "can it go in the dishwasher?", previous_user_turns=["How do I clean a glass kettle?"])
    assert found.answerable and found.hits[0].chunk.heading == "Teaware care > Glass kettles"


def test_follow_up_keeps_its_own_topic_when_that_is_better_supported() -> None:
    found = retrieve(INDEX, "那运费呢？", previous_user_turns=["多久发货？"])
    assert found.answerable
    assert found.hits[0].chunk.heading == "运费多少钱？" and found.query == "那运费呢？"


def test_a_standalone_question_ignores_the_previous_turn() -> None:
    found = retrieve(INDEX, "已经开封的茶叶可以退货吗？", previous_user_turns=["How much is shipping?"])
    assert found.hits[0].chunk.document_id == "returns" and found.query == "已经开封的茶叶可以退货吗？"


@pytest.mark.parametrize("question", ["何时发货？", "几个工作日退款？", "第几天能到"])
def test_question_words_and_a_long_passage_among_faq_items_still_answer(question: str) -> None:
    assert retrieve(INDEX, question).answerable


def test_is_follow_up() -> None:
    assert is_follow_up("那运费呢？", 1)
    assert is_follow_up("and the shipping?", 1)
    assert is_follow_up("What about international orders to Japan and Korea?", 5)
    assert is_follow_up("Can I wash it with soap?", 3)
    assert not is_follow_up("How long does international delivery to Japan take?", 4)
