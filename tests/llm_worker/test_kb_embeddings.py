"""Embeddings through the fake upstream's real HTTP /v1/embeddings: the client, builds with vectors, query fallback."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient

from devtools.fake_embeddings import fake_vector
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from services.llm_worker.grounded import Grounding, plan_turn
from services.llm_worker.kb.build import IndexBuilder, SourceDocument, build_index
from services.llm_worker.kb.embeddings import (
    EmbeddingsConfig,
    EmbeddingsUnavailable,
    QueryEmbedder,
    embed,
    embed_all,
    parse_vectors,
)
from services.llm_worker.kb.ingest import Ingestor, JobQueue
from services.llm_worker.kb.library import KnowledgeLibrary, TenantKnowledge
from services.llm_worker.kb.metrics import KnowledgeMetrics
from services.llm_worker.kb.service import KnowledgeBase
from services.llm_worker.kb.store import KnowledgeStore, Limits
from services.llm_worker.knowledge.index import KnowledgeIndex
from services.llm_worker.plugin_api import ChatMessage

pytestmark = pytest.mark.timeout(120)  # above the minute a test waits for a rebuild

REFUNDS = b"# Refunds\n\nRefunds reach your card within seven business days.\n"
SHIPPING = b"# Shipping\n\nOrders leave our warehouse within 48 hours.\n"
CARE = b"# Tea care\n\nStore tea in a cool, dry place away from light.\n"
PARAPHRASE = "When do I get my money back?"  # no word in common with REFUNDS


def config(upstream: FakeUpstream, **changes: object) -> EmbeddingsConfig:
    return EmbeddingsConfig(**{"base_url": upstream.base_url, "model": "fake-embed", "api_key": "sk-test",
                               "batch": 2, "attempts": 2, **changes})  # type: ignore[arg-type]  # any field


def source(document_id: str, data: bytes, version: int = 1) -> SourceDocument:
    return SourceDocument(document_id, version, "", "", f"{document_id}.md", "markdown", data)


async def test_embed_all_batches_and_returns_normalised_rows_in_order() -> None:
    async with FakeUpstream(FakeUpstreamConfig(expected_api_key="sk-test")) as upstream:
        texts = ["退款多久到账", "Orders ship fast", "茶叶怎么保存", "gift cards", "营业时间"]
        vectors = await embed_all(config(upstream), texts)
        bodies = upstream.received_embeddings
    # Batches of 2, sent concurrently (any order); the rows come back in the texts' order.
    assert sorted(body["input"] for body in bodies) == sorted([texts[0:2], texts[2:4], texts[4:5]])
    assert {body["model"] for body in bodies} == {"fake-embed"}
    assert vectors.dtype == np.float32 and vectors.shape == (5, 256)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[2], fake_vector(texts[2]), atol=1e-6)


async def test_the_fake_speaks_openais_embeddings_format() -> None:
    async with FakeUpstream() as upstream, aiohttp.ClientSession() as http:
        async with http.post(f"{upstream.base_url}/embeddings", json={"model": "m", "input": "hello"}) as response:
            body = await response.json()
        async with http.post(f"{upstream.base_url}/embeddings", json={"model": "m", "input": [""]}) as response:
            refused = (response.status, await response.json())
        async with http.post(f"{upstream.base_url}/embeddings",
                             json={"model": "m", "input": ["hi"], "encoding_format": "base64"}) as response:
            packed = await response.json()
    assert body["object"] == "list" and body["model"] == "m" and body["usage"]["prompt_tokens"] >= 1
    assert body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
    assert math.isclose(sum(x * x for x in body["data"][0]["embedding"]), 1.0, rel_tol=1e-5)
    assert refused[0] == 400 and refused[1]["error"]["param"] == "input"
    assert isinstance(packed["data"][0]["embedding"], str)


def test_parse_vectors_refuses_what_is_not_one_vector_per_input() -> None:
    good = {"data": [{"index": 1, "embedding": [0.0, 2.0]}, {"index": 0, "embedding": [3.0, 4.0]}]}
    assert np.allclose(parse_vectors(good, 2), [[0.6, 0.8], [0.0, 1.0]])
    bad: object
    for bad in ({"data": []}, {"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]},
                {"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]},
                {"data": [{"index": 0, "embedding": "AAAA"}, {"index": 1, "embedding": [1.0]}]},
                {"data": [{"index": 0, "embedding": [float("nan")]}, {"index": 1, "embedding": [1.0]}]}, []):
        with pytest.raises(ValueError):
            parse_vectors(bad, 2)


async def test_embed_fails_as_unavailable_on_an_error_status_and_a_timeout() -> None:
    async with FakeUpstream(FakeUpstreamConfig(embeddings_fail_status=503)) as failing, \
            aiohttp.ClientSession() as http:
        with pytest.raises(EmbeddingsUnavailable, match="503"):
            await embed(http, config(failing), ["x"])
        with pytest.raises(EmbeddingsUnavailable):
            await embed_all(config(failing), ["x"])
        assert len(failing.received_embeddings) == 1 + 2  # two attempts of the batch
    async with FakeUpstream(FakeUpstreamConfig(embeddings_delay_s=5)) as slow, aiohttp.ClientSession() as http:
        with pytest.raises(EmbeddingsUnavailable, match="timed out"):
            await embed(http, config(slow), ["x"], timeout_s=0.2)


async def test_a_build_stores_vectors_and_reuses_those_of_kept_chunks() -> None:
    async with FakeUpstream() as upstream:
        embeddings = config(upstream)
        first = await asyncio.to_thread(build_index, None, {}, [source("refunds", REFUNDS), source("care", CARE)],
                                        embeddings)
        asked = [text for body in upstream.received_embeddings for text in body["input"]]
        assert len(asked) == first.chunks == 2 and any("Refunds reach" in text for text in asked)
        second = await asyncio.to_thread(build_index, first.index, first.documents, [source("shipping", SHIPPING)],
                                         embeddings)
        asked_again = [text for body in upstream.received_embeddings[len(upstream.received_embeddings) - 1:]
                       for text in body["input"]]
    assert asked_again == ["Shipping\nShipping\nOrders leave our warehouse within 48 hours."]
    assert second.index is not None
    index = KnowledgeIndex.from_bytes(second.index)
    assert index.embeddings_model == "fake-embed" and index.vectors is not None and index.vectors.shape[0] == 3
    refunds_id = next(cid for cid, c in index.chunks.items() if c.document_id == "refunds")
    refunds_row = list(index.chunks).index(refunds_id)
    assert np.allclose(index.vectors[refunds_row], fake_vector(index.chunks[refunds_id].indexed_text), atol=1e-6)


async def test_a_build_whose_embeddings_fail_fails_whole() -> None:
    async with FakeUpstream(FakeUpstreamConfig(embeddings_fail_status=500)) as upstream:
        with pytest.raises(EmbeddingsUnavailable):
            await asyncio.to_thread(build_index, None, {}, [source("refunds", REFUNDS)], config(upstream, attempts=1))


async def test_a_build_with_another_model_embeds_every_chunk_again() -> None:
    async with FakeUpstream() as upstream:
        first = await asyncio.to_thread(build_index, None, {}, [source("refunds", REFUNDS), source("care", CARE)],
                                        config(upstream, model="old-model"))
        before = len(upstream.received_embeddings)
        second = await asyncio.to_thread(build_index, first.index, first.documents, [source("shipping", SHIPPING)],
                                         config(upstream))
        embedded = sum(len(body["input"]) for body in upstream.received_embeddings[before:])
    assert embedded == 3 and second.index is not None
    assert KnowledgeIndex.from_bytes(second.index).embeddings_model == "fake-embed"


async def knowledge(upstream: FakeUpstream, embedder: QueryEmbedder | None) -> TenantKnowledge:
    built = await asyncio.to_thread(build_index, None, {}, [source("refunds", REFUNDS), source("shipping", SHIPPING),
                                                            source("care", CARE)], config(upstream))
    assert built.index is not None
    return TenantKnowledge("shop", 1, KnowledgeIndex.from_bytes(built.index), embedder=embedder)


async def test_a_paraphrase_is_retrieved_only_with_the_question_embedded() -> None:
    async with FakeUpstream() as upstream:
        embedder = QueryEmbedder(config(upstream))
        try:
            with_dense = await knowledge(upstream, embedder)
            assert with_dense.dense
            found = await with_dense.search_fused(PARAPHRASE, 3)
            retrieval = await with_dense.retrieve_fused(PARAPHRASE, k=3)
        finally:
            await embedder.aclose()
        bm25_only = await knowledge(upstream, None)
        assert not bm25_only.dense and await bm25_only.search_fused(PARAPHRASE, 3) == []
    assert found[0].chunk.document_id == "refunds" and found[0].similarity > 0.5
    assert retrieval.hits[0].chunk.document_id == "refunds"
    assert not retrieval.answerable  # the decision stays BM25's: no word of the question is in the documents


async def test_a_failed_question_embedding_falls_back_to_bm25_counted_and_retried_next_turn() -> None:
    failures: list[int] = []
    async with FakeUpstream(FakeUpstreamConfig(embeddings_fail_status=503)) as upstream:
        working = FakeUpstream(FakeUpstreamConfig(), port=0)
        async with working:
            snapshot = await knowledge(working, QueryEmbedder(config(upstream), on_failure=lambda: failures.append(1)))
        try:
            hits = await snapshot.search_fused("orders warehouse hours", 3)
            assert [h.chunk.document_id for h in hits] == ["shipping"]  # BM25 alone
            assert await snapshot.search_fused(PARAPHRASE, 3) == []
            assert len(failures) == 2  # not cached: each turn asks again
        finally:
            assert snapshot.embedder is not None
            assert isinstance(snapshot.embedder, QueryEmbedder)
            await snapshot.embedder.aclose()


async def test_a_question_embedding_is_cached() -> None:
    async with FakeUpstream() as upstream:
        embedder = QueryEmbedder(config(upstream), cache_size=1)
        try:
            first = await embedder.vector("退款")
            again = await embedder.vector("退款")
            await embedder.vector("发货")
            await embedder.vector("退款")
        finally:
            await embedder.aclose()
        assert first is not None and again is first
        assert [body["input"] for body in upstream.received_embeddings] == [["退款"], ["发货"], ["退款"]]


async def test_an_index_without_vectors_serves_bm25_and_is_rebuilt_with_them(nats_client: NatsClient) -> None:
    metrics = KnowledgeMetrics()
    store = await KnowledgeStore.open(nats_client, Limits())
    queue = JobQueue(nats_client)
    await queue.ensure()
    plain: IndexBuilder = IndexBuilder()
    embedding: IndexBuilder | None = None
    async with FakeUpstream() as upstream:
        embedder = QueryEmbedder(config(upstream))
        library = KnowledgeLibrary(store, metrics, rebuild=queue.rebuild, embedder=embedder)
        await library.start(nats_client)
        base = KnowledgeBase(store, queue, library, metrics)
        try:
            for document_id, data in (("refunds", REFUNDS), ("shipping", SHIPPING)):
                await base.put("shop", document_id=document_id, title="", url="", filename=f"{document_id}.md",
                               content_type="", data=data)
            await Ingestor(store, plain, metrics).reconcile("shop")  # built before KEFU_EMBEDDINGS_MODEL was set
            before = await library.snapshot("shop")
            assert before.index is not None and not before.dense
            assert [h.chunk.document_id for h in await before.search_fused("orders warehouse", 3)] == ["shipping"]
            # The load asked for a rebuild: a replica with the model takes the job and embeds every chunk.
            embedding = IndexBuilder(config(upstream))
            run = asyncio.create_task(Ingestor(store, embedding, metrics, published=library.published).run(
                nats_client, fetch_timeout_s=0.3))
            try:
                for _ in range(1200):  # a fresh build process (spawn) on a loaded machine: up to a minute
                    after = await library.snapshot("shop")
                    if after.dense:
                        break
                    await asyncio.sleep(0.05)
            finally:
                run.cancel()
                await asyncio.wait([run])
            assert after.dense and after.version > before.version
            assert (await after.search_fused(PARAPHRASE, 3))[0].chunk.document_id == "refunds"
        finally:
            await library.aclose()
            await embedder.aclose()
            await plain.aclose()
            if embedding is not None:
                await embedding.aclose()


class OneTenant:
    def __init__(self, knowledge: TenantKnowledge) -> None:
        self.knowledge = knowledge

    async def snapshot(self, tenant: str) -> TenantKnowledge:
        return self.knowledge


async def test_a_turn_gets_the_fused_passages_keeps_the_bm25_decision_and_embeds_only_when_used() -> None:
    async with FakeUpstream() as upstream:
        embedder = QueryEmbedder(config(upstream))
        try:
            source = OneTenant(await knowledge(upstream, embedder))
            question = [ChatMessage("user", PARAPHRASE)]
            strict_plan = await plan_turn(source, "shop", question, Grounding(), offline=False)
            asked_for_handoff = [PARAPHRASE] in [body["input"] for body in upstream.received_embeddings]
            open_plan = await plan_turn(source, "shop", question, Grounding("open"), offline=False)
        finally:
            await embedder.aclose()
    assert not asked_for_handoff  # a handoff uses no passage: its question is not embedded
    # Open grounding sends the model the passages: the paraphrase's passage comes first.
    assert open_plan.kind == "grounded" and open_plan.hits[0].chunk.document_id == "refunds"
    assert not open_plan.answerable
    assert strict_plan.kind == "handoff"  # strict: BM25 found no support, the embeddings do not overrule it


async def test_dimensions_are_asked_for_and_name_the_vectors() -> None:
    async with FakeUpstream() as upstream:
        short = config(upstream, dimensions=64)
        built = await asyncio.to_thread(build_index, None, {}, [source("refunds", REFUNDS)], short)
        embedder = QueryEmbedder(short)
        try:
            vector = await embedder.vector("refund")
        finally:
            await embedder.aclose()
        assert {body.get("dimensions") for body in upstream.received_embeddings} == {64}
    assert built.index is not None
    index = KnowledgeIndex.from_bytes(built.index)
    assert index.embeddings_model == "fake-embed@64" and index.vectors is not None and index.vectors.shape[1] == 64
    assert vector is not None and vector.shape == (64,)
    # The same model at its own length is another set of vectors: such an index is rebuilt, not mixed.
    assert TenantKnowledge("shop", 1, index, embedder=QueryEmbedder(config(upstream))).dense is False
    assert TenantKnowledge("shop", 1, index, embedder=QueryEmbedder(short)).dense is True
