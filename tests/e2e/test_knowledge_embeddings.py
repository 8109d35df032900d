"""Dense retrieval in the real stack: chunks and questions embedded through the fake upstream's /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from devtools.devstack.stack import Stack, free_port
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from tests.e2e.stack_helpers import auth, start_stack

ADMIN = auth(tenant="dense-shop", sub="boss", role="admin")
REFUNDS = "# Refunds\n\nRefunds reach your card within seven business days.\n"
SHIPPING = "# Shipping\n\nOrders leave our warehouse within 48 hours.\n"
CARE = "# Tea care\n\nStore tea in a cool, dry place away from light.\n"
PARAPHRASE = "When do I get my money back?"
"""Shares no word with any document: BM25 finds nothing, the fake's embedding model relates it to refunds."""
EMBEDDINGS_MODEL = "fake-embed-1"


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def dense_stack(tmp_path_factory: pytest.TempPathFactory, port: int) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("dense-stack"), {
        "KEFU_RATE_LIMIT_RPS": "1000", "KEFU_OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
        "KEFU_MODEL": "fake-model", "KEFU_OPENAI_API_KEY": "sk-dense", "KEFU_EMBEDDINGS_MODEL": EMBEDDINGS_MODEL,
        "KEFU_EMBEDDINGS_TIMEOUT_S": "0.5"})
    try:
        yield stack
    finally:
        stack.stop()


async def search(http: aiohttp.ClientSession, stack: Stack, query: str) -> list[dict[str, Any]]:
    async with http.post(f"{stack.base_url}/v1/knowledge/search", json={"query": query, "k": 3},
                         headers=ADMIN) as response:
        assert response.status == 200, await response.text()
        return list((await response.json())["results"])


async def ready(http: aiohttp.ClientSession, stack: Stack, document_id: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with http.get(f"{stack.base_url}/v1/knowledge/documents/{document_id}", headers=ADMIN) as response:
            document = await response.json()
        if document["status"] == "ready":
            return
        assert document["status"] != "failed", document
        await asyncio.sleep(0.1)
    raise AssertionError(f"{document_id} never became ready")


def query_failures(stack: Stack) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics",
                                  timeout=5).read().decode()
    line = next((line for line in text.splitlines()
                 if line.startswith('kefu_kb_embedding_failures_total{stage="query"}')), None)
    return float(line.split()[-1]) if line else 0.0


async def test_a_paraphrase_is_retrieved_only_with_embeddings_and_bm25_serves_when_they_fail(
        dense_stack: Stack, port: int) -> None:
    async with FakeUpstream(FakeUpstreamConfig(expected_api_key="sk-dense"), port=port) as upstream, \
            aiohttp.ClientSession() as http:
        for document_id, text in (("refunds", REFUNDS), ("shipping", SHIPPING), ("care", CARE)):
            body = {"document_id": document_id, "filename": f"{document_id}.md",
                    "content_base64": base64.b64encode(text.encode()).decode()}
            async with http.post(f"{dense_stack.base_url}/v1/knowledge/documents", json=body,
                                 headers=ADMIN) as response:
                assert response.status == 202, await response.text()
        for document_id in ("refunds", "shipping", "care"):
            await ready(http, dense_stack, document_id)
        # Ingestion embedded every chunk with the configured model.
        embedded = [text for body in upstream.received_embeddings for text in body["input"]]
        assert {body["model"] for body in upstream.received_embeddings} == {EMBEDDINGS_MODEL}
        assert any("Refunds reach your card" in text for text in embedded)
        assert any("Store tea in a cool" in text for text in embedded)

        found = await search(http, dense_stack, PARAPHRASE)
        assert found and found[0]["document_id"] == "refunds"
        assert [PARAPHRASE] in [body["input"] for body in upstream.received_embeddings]
        # A question sharing words still ranks by both: BM25's pick stays on top.
        assert (await search(http, dense_stack, "orders warehouse"))[0]["document_id"] == "shipping"

    before = query_failures(dense_stack)
    async with FakeUpstream(FakeUpstreamConfig(embeddings_fail_status=503), port=port), \
            aiohttp.ClientSession() as http:
        # The question's embedding fails: that search uses BM25 alone (no error), and the failure is counted.
        assert await search(http, dense_stack, "How long until my money comes back?") == []
        assert (await search(http, dense_stack, "orders warehouse"))[0]["document_id"] == "shipping"
    assert query_failures(dense_stack) >= before + 1

    async with FakeUpstream(FakeUpstreamConfig(embeddings_delay_s=3), port=port), aiohttp.ClientSession() as http:
        started = time.monotonic()
        assert await search(http, dense_stack, "Can I have my money back soon?") == []  # timed out: BM25 alone
        assert time.monotonic() - started < 2.5
