"""Moderation publishes the lexicon in use to NATS KV: at start, after a reload, again when it went missing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from devtools.devstack.nats_server import NatsServer
from services.common.lexicon.model import Action
from services.common.lexicon.wire import LEXICON_BUCKET, LEXICON_KEY, decode, encode
from services.moderation import publish
from services.moderation.metrics import ModerationMetrics
from services.moderation.publish import publish_forever
from services.moderation.reload import LexiconReloader, ReloadResult
from tests.moderation.lexicon_helpers import wait_until, write_files

OLD = {"abuse.txt": "# action: mask\n傻逼\n", "fraud.txt": "刷单返利\n"}


@pytest.fixture
def metrics() -> ModerationMetrics:
    return ModerationMetrics()


@pytest.fixture
def reloader(tmp_path: Path, metrics: ModerationMetrics) -> LexiconReloader:
    write_files(tmp_path / "lexicon", OLD)
    return LexiconReloader.load(tmp_path / "lexicon", metrics)


@pytest.fixture
async def published(nats_server: NatsServer, nats_client: NatsClient, reloader: LexiconReloader,
                    metrics: ModerationMetrics, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KeyValue]:
    """The publisher running; the bucket once its first value is in."""
    monkeypatch.setattr(publish, "CHECK_S", 0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(publish_forever(nats_server.url, 1, reloader, metrics, stop))
    try:
        js = nats_client.jetstream()
        kv: list[KeyValue] = []

        async def opened() -> bool:
            try:
                kv.append(await js.key_value(LEXICON_BUCKET))
                await kv[0].get(LEXICON_KEY)
                return True
            except Exception:
                kv.clear()
                return False

        for _ in range(200):
            if await opened():
                break
            await asyncio.sleep(0.05)
        assert kv, "nothing published"
        yield kv[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def publishes(metrics: ModerationMetrics, result: str) -> float:
    return metrics.registry.get_sample_value(
        "kefu_moderation_lexicon_publishes_total", {"result": result}) or 0.0


async def test_publish_puts_the_lexicon_in_use_at_start(published: KeyValue, reloader: LexiconReloader,
                                                        metrics: ModerationMetrics) -> None:
    entry = await published.get(LEXICON_KEY)
    assert entry.value is not None and decode(entry.value) == reloader.matcher.lexicon
    assert publishes(metrics, "ok") == 1


async def test_publish_follows_a_reload_and_skips_an_unchanged_lexicon(
        published: KeyValue, reloader: LexiconReloader, metrics: ModerationMetrics) -> None:
    first = (await published.get(LEXICON_KEY)).revision
    write_files(reloader.folder, {**OLD, "fraud.txt": "刷单返利\n网络赌博\n"})
    assert await reloader.reload() is ReloadResult.OK
    await wait_until(lambda: publishes(metrics, "ok") == 2)
    entry = await published.get(LEXICON_KEY)
    assert entry.value is not None and decode(entry.value).word_count == 3 and entry.revision != first
    # The same words in a rewritten folder: nothing swapped, nothing written.
    write_files(reloader.folder, {**OLD, "fraud.txt": "刷单返利\n网络赌博\n"})
    assert await reloader.reload() is ReloadResult.UNCHANGED
    await asyncio.sleep(0.3)
    assert (await published.get(LEXICON_KEY)).revision == entry.revision and publishes(metrics, "ok") == 2


async def test_publish_puts_back_a_value_that_went_missing(published: KeyValue, reloader: LexiconReloader) -> None:
    deleted = await published.delete(LEXICON_KEY)
    assert deleted
    for _ in range(100):
        try:
            entry = await published.get(LEXICON_KEY)
            break
        except KeyNotFoundError:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("the lexicon was not put back")
    assert entry.value == encode(reloader.matcher.lexicon)
    assert reloader.matcher.check("刷单返利").verdict is Action.BLOCK
