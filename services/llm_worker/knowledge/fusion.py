"""Reciprocal rank fusion of the BM25 and the dense (embedding) rankings of one query."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from services.llm_worker.knowledge.models import Hit, Retrieval

RRF_K = 60
"""The rank constant of Cormack, Clarke and Büttcher (SIGIR 2009): a document's fused score is the sum
over rankings of 1 / (RRF_K + rank), rank counting from 1; 60 is their value and the usual default."""


def rrf_scores(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> dict[str, float]:
    """Each id's fused score over `rankings` (each best first; an id absent from a ranking adds nothing),
    in order of decreasing score; ties keep the order of first appearance (the first ranking wins)."""
    if k < 0:
        raise ValueError(f"the RRF constant must be >= 0, got {k}")
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(dict.fromkeys(ranking), 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    order = sorted(scores, key=lambda item: -scores[item])  # stable: ties stay in first-seen order
    return {item: scores[item] for item in order}


def fuse(retrieval: Retrieval, dense: Sequence[Hit], k: int, *, rrf_k: int = RRF_K) -> Retrieval:
    """`retrieval`'s BM25 hits and the `dense` hits in reciprocal-rank-fused order, the best `k`.

    Only the order (and which passages make the top `k`) changes: the answer-or-hand-off decision and
    its confidence are BM25's, measured on held-out data; a chunk found by both keeps its BM25 fields
    and gains its similarity; a chunk found only by embeddings has BM25 fields of 0.
    """
    if not dense:
        return retrieval
    by_id: dict[str, Hit] = {hit.chunk.chunk_id: hit for hit in retrieval.hits}
    for hit in dense:
        held = by_id.get(hit.chunk.chunk_id)
        by_id[hit.chunk.chunk_id] = hit if held is None else replace(held, similarity=hit.similarity)
    order = rrf_scores([[hit.chunk.chunk_id for hit in retrieval.hits], [hit.chunk.chunk_id for hit in dense]],
                       rrf_k)
    hits = tuple(by_id[chunk_id] for chunk_id in list(order)[:k])
    return replace(retrieval, hits=hits)
