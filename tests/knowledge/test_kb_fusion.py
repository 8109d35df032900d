"""Reciprocal rank fusion of BM25 and dense rankings, and the index's vectors (dense search, byte format)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from services.llm_worker.knowledge.fusion import RRF_K, fuse, rrf_scores
from services.llm_worker.knowledge.index import IndexFormatError, KnowledgeIndex
from services.llm_worker.knowledge.models import Chunk, Hit, Retrieval


def chunk(n: int, text: str) -> Chunk:
    return Chunk(chunk_id=f"d-1-{n}", document_id=f"doc{n}", version=1, title="Shop", url="", heading="", text=text)


CHUNKS = [chunk(0, "Orders ship within 48 hours."), chunk(1, "Refunds reach your card within 7 days."),
          chunk(2, "Store tea in a cool, dry place."), chunk(3, "Gift cards never expire.")]
# Hand-made unit vectors: chunk i points along axis i (chunk 3 halfway between axes 1 and 3).
VECTORS = np.asarray([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1]], dtype=np.float32)


def test_rrf_scores_sum_reciprocal_ranks_with_k_60() -> None:
    scores = rrf_scores([["a", "b", "c"], ["c", "a"]])
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["b"] == pytest.approx(1 / 62)
    assert list(scores) == ["a", "c", "b"] and RRF_K == 60


def test_rrf_scores_break_ties_by_first_appearance_and_count_repeats_once() -> None:
    assert list(rrf_scores([["x", "y"], ["y", "x"]])) == ["x", "y"]
    assert rrf_scores([["x", "x", "y"]]) == {"x": pytest.approx(1 / 61), "y": pytest.approx(1 / 62)}
    with pytest.raises(ValueError):
        rrf_scores([["x"]], k=-1)


def hit(n: int, score: float = 0.0, similarity: float = 0.0) -> Hit:
    return Hit(chunk=CHUNKS[n], score=score, tf_score=score, similarity=similarity)


def test_fuse_reorders_and_adds_dense_only_hits_keeping_the_decision() -> None:
    retrieval = Retrieval(hits=(hit(0, 5.0), hit(2, 1.0)), answerable=True, query="q", confidence=0.4)
    fused = fuse(retrieval, [hit(2, similarity=0.9), hit(1, similarity=0.8)], k=3)
    assert [h.chunk.chunk_id for h in fused.hits] == ["d-1-2", "d-1-0", "d-1-1"]
    both = fused.hits[0]
    assert (both.score, both.similarity) == (1.0, 0.9)  # BM25 fields kept, similarity added
    assert (fused.answerable, fused.confidence, fused.query) == (True, 0.4, "q")
    assert len(fuse(retrieval, [hit(3, similarity=0.5)], k=2).hits) == 2


def test_fuse_without_dense_hits_is_the_bm25_retrieval() -> None:
    retrieval = Retrieval(hits=(hit(0, 5.0),), answerable=False, query="q")
    assert fuse(retrieval, [], k=5) is retrieval


def test_dense_search_ranks_by_cosine() -> None:
    index = KnowledgeIndex.build(CHUNKS, vectors=VECTORS * 3, embeddings_model="m")  # normalised on build
    hits = index.dense_search(np.asarray([0, 2, 0, 1], dtype=np.float32), k=3)
    assert [h.chunk.chunk_id for h in hits] == ["d-1-3", "d-1-1", "d-1-0"]
    assert hits[0].similarity == pytest.approx((2 + 1) / (np.sqrt(5) * np.sqrt(2)), rel=1e-5)
    assert hits[0].score == 0.0
    assert index.dense_search(np.zeros(4, dtype=np.float32)) == []
    with pytest.raises(ValueError):
        index.dense_search(np.ones(3, dtype=np.float32))
    assert KnowledgeIndex.build(CHUNKS).dense_search(np.ones(4, dtype=np.float32)) == []


def test_vectors_round_trip_and_count_in_nbytes() -> None:
    index = KnowledgeIndex.build(CHUNKS, vectors=VECTORS, embeddings_model="text-embedding-3-small")
    loaded = KnowledgeIndex.from_bytes(index.to_bytes())
    assert loaded.embeddings_model == "text-embedding-3-small"
    assert loaded.vectors is not None and index.vectors is not None and np.array_equal(loaded.vectors, index.vectors)
    assert index.nbytes - KnowledgeIndex.build(CHUNKS).nbytes == VECTORS.nbytes
    plain = KnowledgeIndex.from_bytes(KnowledgeIndex.build(CHUNKS).to_bytes())
    assert plain.vectors is None and plain.embeddings_model == ""


def rewritten(data: bytes, change: dict[str, bytes | None]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            if name in change and change[name] is None:
                continue
            target.writestr(name, change.get(name) or source.read(name))
    return out.getvalue()


def test_a_format_3_index_without_vectors_still_loads() -> None:
    data = KnowledgeIndex.build(CHUNKS).to_bytes()
    meta = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("meta.json"))
    old = rewritten(data, {"meta.json": json.dumps({k: v for k, v in meta.items() if k != "embeddings_model"}
                                                   | {"format": 3}).encode()})
    assert KnowledgeIndex.from_bytes(old).search("refunds")[0].chunk.chunk_id == "d-1-1"
    with pytest.raises(IndexFormatError):
        KnowledgeIndex.from_bytes(rewritten(data, {"meta.json": json.dumps(meta | {"format": 2}).encode()}))


def test_vectors_that_do_not_fit_the_chunks_are_refused() -> None:
    data = KnowledgeIndex.build(CHUNKS, vectors=VECTORS, embeddings_model="m").to_bytes()
    buffer = io.BytesIO()
    np.save(buffer, VECTORS[:3], allow_pickle=False)
    with pytest.raises(IndexFormatError):
        KnowledgeIndex.from_bytes(rewritten(data, {"vectors.npy": buffer.getvalue()}))
    with pytest.raises(ValueError):
        KnowledgeIndex.build(CHUNKS, vectors=VECTORS[:3], embeddings_model="m")
    with pytest.raises(ValueError):
        KnowledgeIndex.build(CHUNKS, vectors=VECTORS)  # vectors without their model
