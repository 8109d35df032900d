"""Extractive answers: the FAQ answer, or the passage sentences that answer, with the citation."""

from __future__ import annotations

from services.llm_worker.knowledge.extractive import MAX_CHARS, extract_answer
from services.llm_worker.knowledge.models import Chunk, Hit
from services.llm_worker.knowledge.retrieval import retrieve
from tests.knowledge.kb_corpus import shop_index

INDEX = shop_index()


def test_an_faq_hit_answers_with_its_answer() -> None:
    found = retrieve(INDEX, "运费多少钱？")
    extract = extract_answer("运费多少钱？", found.hits)
    assert extract is not None and extract.cited == (0,)
    assert extract.text == found.hits[0].chunk.answer and "99" in extract.text
    assert extract.quotes == (extract.text,)


def test_a_passage_answers_with_the_sentence_that_matches() -> None:
    question = "已经开封的茶叶可以退货吗？"
    extract = extract_answer(question, retrieve(INDEX, question).hits)
    assert extract is not None
    assert "已开封的茶叶因食品安全原因不支持退货" in extract.text


def test_extract_is_capped_and_in_document_order() -> None:
    sentences = [f"第{n}句讲的是第{n}件不同的事情，内容比较长一些。" for n in range(30)] + ["退货运费由买家承担。"]
    chunk = Chunk(chunk_id="d-1-0", document_id="d", version=1, title="t", url="", heading="", text="".join(sentences))
    extract = extract_answer("退货运费谁承担", [Hit(chunk=chunk, score=1.0)])
    assert extract is not None and "退货运费由买家承担。" in extract.text
    assert len(extract.text) <= MAX_CHARS
    assert extract.text.index("第29句") < extract.text.index("退货运费")


def test_the_answer_may_come_from_a_lower_hit_and_cites_it() -> None:
    first = Chunk(chunk_id="a-1-0", document_id="a", version=1, title="A", url="", heading="", text="茶叶的产地介绍。")
    second = Chunk(chunk_id="b-1-0", document_id="b", version=1, title="B", url="", heading="",
                   text="普洱茶的保质期是十年。存放需要避光防潮。")
    extract = extract_answer("普洱茶的保质期是多久", [Hit(first, 2.0), Hit(second, 1.9)])
    assert extract is not None and extract.cited == (1,) and "保质期是十年" in extract.text


def test_no_hits_no_extract() -> None:
    assert extract_answer("运费", []) is None
