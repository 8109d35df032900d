"""The BM25 index: ranking, coverage, lookup by id, size, and the byte format's round trip and checks."""

from __future__ import annotations

import io
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.llm_worker.knowledge.index import IndexFormatError, KnowledgeIndex
from services.llm_worker.knowledge.models import Chunk, ChunkKind


def chunk(n: int, text: str, *, kind: ChunkKind = "text", answer: str = "", title: str = "Shop") -> Chunk:
    return Chunk(chunk_id=f"d-1-{n}", document_id="d", version=1, title=title, url="https://shop/help",
                 heading="", text=text, kind=kind, answer=answer)


CHUNKS = [
    chunk(0, "国内订单满99元包邮，不满99元收运费8元。"),
    chunk(1, "收到商品7天内可以申请退货，茶叶需未开封。"),
    chunk(2, "Orders paid before 4 pm ship the same day."),
    chunk(3, "运费多少？\n包邮吗", kind="faq", answer="满99元包邮。"),
    chunk(4, "Refunds reach your account within 3 working days."),
]
INDEX = KnowledgeIndex.build(CHUNKS)


def test_search_ranks_the_matching_chunk_first() -> None:
    assert INDEX.search("怎么退货？")[0].chunk.chunk_id == "d-1-1"
    assert INDEX.search("When do orders ship?")[0].chunk.chunk_id == "d-1-2"
    assert INDEX.search("how long do refunds take")[0].chunk.chunk_id == "d-1-4"


def test_search_folds_traditional_chinese() -> None:
    assert INDEX.search("運費")[0].chunk.text in (CHUNKS[0].text, CHUNKS[3].text)


def test_search_returns_only_chunks_sharing_a_term_best_first() -> None:
    hits = INDEX.search("运费", k=5)
    assert {h.chunk.chunk_id for h in hits} == {"d-1-0", "d-1-3"}
    assert hits[0].score >= hits[1].score > 0
    assert INDEX.search("量子力学") == [] and INDEX.search("") == []


def test_search_accepts_terms() -> None:
    assert INDEX.search(["退货"])[0].chunk.chunk_id == "d-1-1"


def test_coverage_is_the_idf_weighted_share_of_query_terms_in_the_chunk() -> None:
    full = INDEX.search("ship same day")[0]
    assert full.coverage == pytest.approx(1.0)
    partial = INDEX.search("ship to mars")[0]
    assert 0 < partial.coverage < 0.5


def test_chunks_by_id_and_size() -> None:
    assert INDEX.chunks["d-1-3"].answer == "满99元包邮。"
    assert len(INDEX) == 5 and INDEX.nbytes > sum(len(c.text) for c in CHUNKS)


def test_bytes_round_trip_gives_the_same_results() -> None:
    loaded = KnowledgeIndex.from_bytes(INDEX.to_bytes())
    assert list(loaded.chunks.values()) == CHUNKS
    for question in ("运费多少", "退货", "refund days", "ship"):
        assert loaded.search(question) == INDEX.search(question)


def test_bytes_hold_no_pickle() -> None:
    with zipfile.ZipFile(io.BytesIO(INDEX.to_bytes())) as archive:
        assert sorted(archive.namelist()) == ["chunks.json", "data.npy", "indices.npy", "indptr.npy", "lengths.npy",
                                              "meta.json", "vocabulary.json"]


def test_empty_index_searches_nothing_and_round_trips() -> None:
    empty = KnowledgeIndex.build([])
    assert empty.search("运费") == [] and len(KnowledgeIndex.from_bytes(empty.to_bytes())) == 0


def test_from_bytes_rejects_a_damaged_index() -> None:
    data = INDEX.to_bytes()
    with pytest.raises(IndexFormatError):
        KnowledgeIndex.from_bytes(data[: len(data) // 2])
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            target.writestr(name, b'["x"]' if name == "vocabulary.json" else source.read(name))
    with pytest.raises(IndexFormatError):
        KnowledgeIndex.from_bytes(out.getvalue())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=500))
def test_from_bytes_raises_only_index_format_error(data: bytes) -> None:
    with pytest.raises(IndexFormatError):
        KnowledgeIndex.from_bytes(data)


def test_query_terms_recut_a_glued_unknown_word_into_words_of_the_index() -> None:
    index = KnowledgeIndex.build([
        Chunk(chunk_id="r-1-0", document_id="r", version=1, title="刘六刘七起义", url="", heading="",
              text="刘七在狼山战斗中中箭落水而死。"),
        Chunk(chunk_id="h-1-0", document_id="h", version=1, title="马", url="", heading="", text="马是一种动物。")])
    assert index.analyzer.terms("刘七是怎么死的？") == ["刘七是", "死"]  # the segmenter glues 是 to the name
    assert index.query_terms("刘七是怎么死的？") == ["刘七", "死"]
    assert index.search("刘七是怎么死的？")[0].chunk.chunk_id == "r-1-0"
    # A name the index lacks is not cut into single characters it has: it stays unknown (against answering).
    assert index.query_terms("马飚担任什么职务？") == index.analyzer.terms("马飚担任什么职务？")


def test_query_terms_join_neighbours_cut_apart_into_the_word_of_the_index() -> None:
    index = KnowledgeIndex.build([
        Chunk(chunk_id="j-1-0", document_id="j", version=1, title="锦地罗", url="", heading="",
              text="锦地罗是茅膏菜科茅膏菜属的植物。")])
    assert index.analyzer.terms("锦地罗的全长是多少厘米？")[:2] == ["锦地", "罗"]
    assert index.query_terms("锦地罗的全长是多少厘米？")[0] == "锦地罗"
