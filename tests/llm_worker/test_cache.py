"""The answer cache: the cacheable rule, keys per tenant, both tiers, epochs, pre-generation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType

from services.llm_worker.answering import AnswerDone, Answerer, AnswerRequest
from services.llm_worker.cache import CACHE_BUCKET, AnswerCache, CachedAnswer, LocalTier
from services.llm_worker.cache_key import CacheKey, cacheable_question, normalize_question
from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_api import ChatMessage, GenerationParams
from services.llm_worker.plugin_host import PluginHost
from services.llm_worker.pregen import Pregenerator
from tests.llm_worker.plugin_fixtures import plugin_source, replace_file, write_version

SYSTEM = ChatMessage("system", "You are a shop assistant.")
SUGGESTING_PLUGIN = plugin_source("v1").replace("plugin = Versioned", """
Versioned.suggest_next = lambda self, q, limit=3: ['what about returns?']
Versioned.is_standalone = lambda self, q: 'order' not in q
plugin = Versioned""")


def answer_of(text: str) -> CachedAnswer:
    return CachedAnswer(text, "stop", "m", 10, 5)


def test_cache_normalizes_width_case_punctuation_and_traditional() -> None:
    assert normalize_question("  請問，發貨時間？ ") == normalize_question("请问 发货时间")
    assert normalize_question("ＨＯＷ long does Shipping take?!") == "how long does shipping take"


def test_cache_rule_only_the_first_question_of_a_conversation() -> None:
    assert cacheable_question([SYSTEM, ChatMessage("user", "Shipping?")]) == "shipping"
    assert cacheable_question([SYSTEM, ChatMessage("user", "hi"), ChatMessage("assistant", "hello"),
                               ChatMessage("user", "my order 123 is late")]) is None
    assert cacheable_question([ChatMessage("user", "a"), ChatMessage("user", "b")]) is None
    assert cacheable_question([ChatMessage("user", "??")]) is None
    # Personal data makes even a first question uncacheable (full-width digits included).
    assert cacheable_question([ChatMessage("user", "我的订单２０２５０００１１１１到哪了？")]) is None
    assert cacheable_question([ChatMessage("user", "please mail me at li@example.com")]) is None


def test_cache_rule_later_questions_only_when_all_are_standalone() -> None:
    def standalone(question: str) -> bool:
        return "order" not in question

    general = [SYSTEM, ChatMessage("user", "Shipping?"), ChatMessage("assistant", "2 days"),
               ChatMessage("user", "Returns?")]
    assert cacheable_question(general, standalone) == "returns"
    assert cacheable_question(general) is None  # nobody to judge: never
    personal = [SYSTEM, ChatMessage("user", "my order 42"), ChatMessage("assistant", "looking"),
                ChatMessage("user", "Returns?")]
    assert cacheable_question(personal, standalone) is None
    with_agent = [*general[:3], ChatMessage("agent", "Hi, Li here"), ChatMessage("user", "Returns?")]
    assert cacheable_question(with_agent, standalone) is None


def test_cache_key_never_crosses_tenants() -> None:
    messages = [SYSTEM, ChatMessage("user", "Shipping?")]
    a = CacheKey.of("tenant-a", "default", "v", messages, "shipping", GenerationParams(), "0")
    b = CacheKey.of("tenant-b", "default", "v", messages, "shipping", GenerationParams(), "0")
    other_prompt = CacheKey.of("tenant-a", "default", "v", [ChatMessage("system", "Other."), messages[1]],
                               "shipping", GenerationParams(), "0")
    assert len({a.kv_key, b.kv_key, other_prompt.kv_key}) == 3
    assert a.kv_key.startswith("tenant-a.") and b.kv_key.startswith("tenant-b.")


def test_cache_local_tier_is_bounded_by_bytes_and_ttl() -> None:
    now = [0.0]
    dropped: list[tuple[str, bool]] = []
    tier = LocalTier(1000, 60, clock=lambda: now[0], on_drop=lambda a, served: dropped.append((a.text, served)))
    for i in range(20):
        tier.put(f"k{i}", answer_of("x" * 100 + str(i)))
    assert tier.bytes <= 1000 and len(tier) < 20 and tier.get("k0") is None
    assert tier.get("k19") is not None
    now[0] = 61
    assert tier.get("k19") is None
    assert dropped[-1] == ("x" * 100 + "19", True) and dropped[0][1] is False


async def test_cache_shared_tier_and_epochs_span_replicas(nats_client: NatsClient) -> None:
    replica_a = await AnswerCache.with_nats(LocalTier(10_000, 60), nats_client, 60)
    replica_b = await AnswerCache.with_nats(LocalTier(10_000, 60), nats_client, 60)
    try:
        messages = [ChatMessage("user", "Shipping?")]

        def key(cache: AnswerCache, tenant: str) -> CacheKey:
            return CacheKey.of(tenant, "default", "v", messages, "shipping", GenerationParams(),
                               cache.epoch_token(tenant, "default"))

        await replica_a.store(key(replica_a, "t1"), answer_of("two days"))
        found = await replica_b.lookup(key(replica_b, "t1"))
        assert found is not None and found[0].text == "two days" and found[1] == "shared"
        assert await replica_b.lookup(key(replica_b, "t2")) is None
        await replica_a.invalidate(tenant="t1")
        deadline = time.monotonic() + 5
        while await replica_b.lookup(key(replica_b, "t1")) is not None:
            assert time.monotonic() < deadline, "replica b never saw the invalidation"
            await asyncio.sleep(0.02)
    finally:
        await replica_a.aclose()
        await replica_b.aclose()


async def test_cache_lookups_are_direct_gets_also_in_a_bucket_an_older_kefu_made(nats_client: NatsClient) -> None:
    js = nats_client.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=CACHE_BUCKET, history=1, ttl=60, storage=StorageType.FILE))
    assert not (await js.stream_info(f"KV_{CACHE_BUCKET}")).config.allow_direct
    seen: list[str] = []

    async def heard(message: Msg) -> None:
        seen.append(message.subject.split(".")[2])  # DIRECT or STREAM

    api = [await nats_client.subscribe(f"$JS.API.{kind}.>", cb=heard) for kind in ("DIRECT", "STREAM")]
    cache = await AnswerCache.with_nats(LocalTier(10_000, 60), nats_client, 60)
    try:
        assert (await js.stream_info(f"KV_{CACHE_BUCKET}")).config.allow_direct
        key = CacheKey.of("t1", "default", "v", [ChatMessage("user", "Shipping?")], "shipping", GenerationParams(),
                          cache.epoch_token("t1", "default"))
        seen.clear()
        assert await cache.lookup(key) is None
        await nats_client.flush()
        # One request for the lookup, to the stream itself, not the JetStream API's message get.
        assert seen == ["DIRECT"]
    finally:
        await cache.aclose()
        for subscription in api:
            await subscription.unsubscribe()


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[PluginHost]:
    folder = tmp_path / "plugins"
    write_version(folder, "v1")
    replace_file(folder / "versioned.py", SUGGESTING_PLUGIN)
    plugin_host = PluginHost(folder, "routes.toml", {}, work_dir=tmp_path / "work", settle_s=0.01)
    await plugin_host.start()
    yield plugin_host
    await plugin_host.aclose()


async def ask(answerer: Answerer, tenant: str, *messages: ChatMessage, shareable: bool = True,
              ) -> tuple[str, AnswerDone]:
    parts: list[str] = []
    done = None
    async for event in answerer.answer(AnswerRequest("default", [SYSTEM, *messages], GenerationParams(),
                                                     tenant, "s", shareable=shareable)):
        if isinstance(event, str):
            parts.append(event)
        else:
            done = event
    assert done is not None
    return "".join(parts), done


async def test_answerer_tenant_b_never_gets_tenant_a_cached_answer(host: PluginHost) -> None:
    metrics = WorkerMetrics()
    answerer = Answerer(host, metrics, AnswerCache(LocalTier(1 << 20, 60)))
    question = ChatMessage("user", "How long does shipping take?")
    first_a = await ask(answerer, "tenant-a", question)
    second_a = await ask(answerer, "tenant-a", ChatMessage("user", "how long does SHIPPING take"))
    first_b = await ask(answerer, "tenant-b", question)
    assert (first_a[1].cached, second_a[1].cached, first_b[1].cached) == (False, True, False)
    assert second_a[0] == first_a[0]
    assert metrics.registry.get_sample_value("kefu_cache_requests_total", {"tier": "local", "result": "hit"}) == 1


async def test_answerer_second_turn_with_context_is_never_cached(host: PluginHost) -> None:
    metrics = WorkerMetrics()
    cache = AnswerCache(LocalTier(1 << 20, 60))
    answerer = Answerer(host, metrics, cache)
    turn = (ChatMessage("user", "my order 41"), ChatMessage("assistant", "hello"), ChatMessage("user", "shipping?"))
    assert (await ask(answerer, "t", *turn))[1].cached is False
    assert (await ask(answerer, "t", *turn))[1].cached is False
    assert len(cache.local) == 0
    assert metrics.registry.get_sample_value("kefu_cache_requests_total", {"tier": "local", "result": "miss"}) is None


async def test_answerer_private_turn_neither_reads_nor_fills_the_cache(host: PluginHost) -> None:
    """A turn the edge did not mark shareable (a client-supplied history or prompt) stays out of the cache."""
    cache = AnswerCache(LocalTier(1 << 20, 60))
    answerer = Answerer(host, WorkerMetrics(), cache)
    question = ChatMessage("user", "How long does shipping take?")
    assert (await ask(answerer, "t", question, shareable=False))[1].cached is False
    assert len(cache.local) == 0
    assert (await ask(answerer, "t", question))[1].cached is False  # the private turn filled nothing
    assert (await ask(answerer, "t", question))[1].cached is True
    assert (await ask(answerer, "t", question, shareable=False))[1].cached is False  # nor reads it


async def test_pregeneration_fills_the_cache_and_counts_served(host: PluginHost) -> None:
    metrics = WorkerMetrics()
    cache = AnswerCache(LocalTier(1 << 20, 60))
    pregen = Pregenerator(cache, metrics, live_streams=lambda: 0)
    answerer = Answerer(host, metrics, cache, pregen)
    await ask(answerer, "t", ChatMessage("user", "How long does shipping take?"))
    deadline = time.monotonic() + 5
    while metrics.registry.get_sample_value("kefu_pregenerations_total", {"result": "started"}) is None \
            or len(cache.local) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    text, done = await ask(answerer, "t", ChatMessage("user", "What about returns?"))
    assert done.cached is True and text == "v1/model-a " * 3
    assert metrics.registry.get_sample_value("kefu_pregenerations_total", {"result": "served"}) == 1
    await pregen.aclose()


async def test_pregeneration_yields_to_live_traffic(host: PluginHost) -> None:
    metrics = WorkerMetrics()
    cache = AnswerCache(LocalTier(1 << 20, 60))
    busy = [True]
    pregen = Pregenerator(cache, metrics, live_streams=lambda: 100 if busy[0] else 0, max_live_streams=8)
    answerer = Answerer(host, metrics, cache, pregen)
    await ask(answerer, "t", ChatMessage("user", "How long does shipping take?"))
    await asyncio.sleep(0.2)
    assert len(cache.local) == 1  # only the live answer: pre-generation waits while traffic is high
    busy[0] = False
    deadline = time.monotonic() + 5
    while len(cache.local) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await pregen.aclose()
