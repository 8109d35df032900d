"""The worker's lexicon from NATS KV: none until published, swapped per value, dropped when deleted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from devtools.devstack.nats_server import start_nats_server
from devtools.devstack.stack import free_port
from services.common.lexicon.model import Action, Category, Lexicon
from services.common.lexicon.wire import LEXICON_BUCKET, LEXICON_KEY, bucket_config, encode
from services.llm_worker import lexicon_feed
from services.llm_worker.lexicon_feed import LexiconFeed
from services.llm_worker.metrics import WorkerMetrics

OLD = Lexicon((Category("fraud", Action.BLOCK, ("刷单返利",)),), ())
NEW = Lexicon((Category("fraud", Action.BLOCK, ("刷单返利", "蓝莓松饼")),), ())


@dataclass
class Readiness:
    said: list[bool] = field(default_factory=list)

    async def __call__(self, serving: bool) -> None:
        self.said.append(serving)


@dataclass
class Running:
    feed: LexiconFeed
    ready: Readiness
    metrics: WorkerMetrics

    @property
    def revision(self) -> float | None:
        return self.metrics.registry.get_sample_value("kefu_worker_lexicon_revision")


@pytest.fixture
async def running(nats_client: NatsClient, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Running]:
    monkeypatch.setattr(lexicon_feed, "RETRY_S", 0.05)
    monkeypatch.setattr(lexicon_feed, "CHECK_S", 0.2)
    metrics = WorkerMetrics()
    feed, ready = LexiconFeed(metrics), Readiness()
    task = asyncio.create_task(feed.follow(nats_client, ready))
    try:
        yield Running(feed, ready, metrics)
    finally:
        task.cancel()
        await asyncio.wait([task])


async def bucket(nats_client: NatsClient) -> KeyValue:
    return await nats_client.jetstream().create_key_value(bucket_config())


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met before the deadline")


async def test_lexicon_feed_has_none_until_moderation_publishes(nats_client: NatsClient, running: Running) -> None:
    await asyncio.sleep(0.2)  # no bucket yet: the feed keeps looking
    assert running.feed.matcher is None and running.ready.said == []
    kv = await bucket(nats_client)
    await asyncio.sleep(0.2)  # a bucket without the key: still nothing
    assert running.feed.matcher is None
    revision = await kv.put(LEXICON_KEY, encode(OLD))
    await until(lambda: running.feed.matcher is not None)
    assert running.feed.matcher is not None and running.feed.matcher.check("刷单返利").verdict is Action.BLOCK
    assert running.ready.said == [True] and running.revision == revision == running.feed.revision


async def test_lexicon_feed_swaps_whole_matchers_and_a_turn_keeps_its_own(
        nats_client: NatsClient, running: Running) -> None:
    kv = await bucket(nats_client)
    await kv.put(LEXICON_KEY, encode(OLD))
    await until(lambda: running.feed.matcher is not None)
    turn = running.feed.matcher  # what a turn started now holds to its end
    assert turn is not None
    revision = await kv.put(LEXICON_KEY, encode(NEW))
    await until(lambda: running.feed.revision == revision)
    assert running.feed.matcher is not None and running.feed.matcher.check("蓝莓松饼").verdict is Action.BLOCK
    assert turn.check("蓝莓松饼").verdict is Action.ALLOW  # the old matcher is untouched


async def test_lexicon_feed_keeps_its_lexicon_over_an_unreadable_value(
        nats_client: NatsClient, running: Running, caplog: pytest.LogCaptureFixture) -> None:
    kv = await bucket(nats_client)
    good = await kv.put(LEXICON_KEY, encode(OLD))
    await until(lambda: running.feed.revision == good)
    await kv.put(LEXICON_KEY, b"garbage")
    await until(lambda: "cannot be used" in caplog.text)
    assert running.feed.revision == good and running.feed.matcher is not None


async def test_lexicon_feed_fails_closed_when_the_lexicon_is_deleted(
        nats_client: NatsClient, running: Running) -> None:
    kv = await bucket(nats_client)
    await kv.put(LEXICON_KEY, encode(OLD))
    await until(lambda: running.feed.matcher is not None)
    await kv.delete(LEXICON_KEY)
    await until(lambda: running.feed.matcher is None)
    assert running.ready.said == [True, False] and running.revision == 0
    await kv.put(LEXICON_KEY, encode(NEW))
    await until(lambda: running.feed.matcher is not None)
    assert running.ready.said == [True, False, True]


async def test_lexicon_feed_follows_a_change_made_after_nats_restarted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The watch's consumer lives in the server's memory: a restarted server delivers it nothing more,
    # so the feed notices the stored revision moved and watches anew.
    monkeypatch.setattr(lexicon_feed, "RETRY_S", 0.05)
    monkeypatch.setattr(lexicon_feed, "CHECK_S", 0.2)
    port = free_port()
    server = start_nats_server(tmp_path / "nats", port=port)
    nc = await nats.connect(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1, connect_timeout=1)
    feed = LexiconFeed(WorkerMetrics())
    task = asyncio.create_task(feed.follow(nc, Readiness()))
    try:
        await (await bucket(nc)).put(LEXICON_KEY, encode(OLD))
        await until(lambda: feed.matcher is not None)
        server.stop()
        server = start_nats_server(tmp_path / "nats", port=port)
        writer = await nats.connect(server.url, max_reconnect_attempts=3, connect_timeout=1)
        try:
            revision = await (await writer.jetstream().key_value(LEXICON_BUCKET)).put(LEXICON_KEY, encode(NEW))
        finally:
            await writer.close()
        await until(lambda: feed.revision == revision)
        assert feed.matcher is not None and feed.matcher.check("蓝莓松饼").verdict is Action.BLOCK
    finally:
        task.cancel()
        await asyncio.wait([task])
        await nc.close()
        server.stop()
