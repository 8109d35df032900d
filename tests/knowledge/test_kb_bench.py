"""bench/kb_bench.py's measuring parts, on a slice of the CMRC trial set (the figures themselves are the bench's)."""

from __future__ import annotations

import pytest

from bench.cmrc import Article, Question, load_articles
from bench.kb_bench import OfflineKnowledge, balanced_accuracy, held_out, joined_passages, kept, quality
from bench.kb_scale import synthetic_chunks
from services.llm_worker.knowledge.models import Chunk, Hit

ARTICLES = load_articles()


def test_the_trial_set_is_complete() -> None:
    assert len(ARTICLES) == 256 and sum(len(a.questions) for a in ARTICLES) == 1002


def test_the_held_out_split_is_deterministic_and_about_half() -> None:
    assert [kept(a.id, "") for a in ARTICLES] == [kept(a.id, "") for a in load_articles()]
    assert 100 < sum(kept(a.id, "") for a in ARTICLES) < 156
    assert [kept(a.id, "") for a in ARTICLES] != [kept(a.id, "b") for a in ARTICLES]


def test_quality_counts_a_cited_document_and_a_span() -> None:
    article = Article("a1", "茶", "普洱茶产于云南。普洱茶的保质期是十年。",
                      (Question("q1", "普洱茶的保质期是多久？", ("十年",)),))
    other = Article("a2", "咖啡", "咖啡原产于埃塞俄比亚。", (Question("q2", "咖啡原产于哪里？", ("埃塞俄比亚",)),))
    knowledge = OfflineKnowledge()
    knowledge.ingest([article, other])
    figures = quality(knowledge, [article, other])
    assert figures["recall_at_1"] == 1.0 and figures["span_in_prompt"] == 1.0 and figures["span_in_extract"] == 1.0


def test_quality_on_a_slice_of_cmrc_is_in_range() -> None:
    articles = ARTICLES[:40]
    knowledge = OfflineKnowledge()
    knowledge.ingest(articles)
    figures = quality(knowledge, articles)
    assert figures["recall_at_1"] > 0.9 and figures["span_in_prompt_joined"] > 0.9


def test_held_out_reports_every_split() -> None:
    report = held_out(ARTICLES[:40], salts=("", "b"))
    assert len(report["tuning"]) == 2 and len(report["balanced_accuracy_all_splits"]) == 2
    assert 0.5 < report["balanced_accuracy"] <= 1.0


def test_balanced_accuracy() -> None:
    assert balanced_accuracy([True, False, False, False], [True, True, False, False]) == pytest.approx(0.75)


def test_joined_passages_merge_consecutive_chunks_of_a_document_once() -> None:
    def hit(n: int, text: str, document: str = "d") -> Hit:
        return Hit(Chunk(chunk_id=f"{document}-1-{n}", document_id=document, version=1, title="", url="",
                         heading="", text=text), 1.0)

    texts = joined_passages([hit(1, "第二句。第三句。"), hit(0, "第一句。第二句。"), hit(0, "别的。", "e")])
    assert texts == ["第一句。第二句。第三句。", "别的。"]


def test_synthetic_chunks_are_seeded() -> None:
    first, again = synthetic_chunks(ARTICLES, 20, seed=3), synthetic_chunks(ARTICLES, 20, seed=3)
    assert first == again and len({c.chunk_id for c in first}) == 20
