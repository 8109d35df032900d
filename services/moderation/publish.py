"""Publishing the lexicon in use to NATS KV, where every llm worker's output filter reads it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.common.lexicon.wire import LEXICON_KEY, LexiconWireError, bucket_config, encode
from services.common.nats_client import close_nats, connect_nats, ensure_key_value
from services.moderation.metrics import ModerationMetrics
from services.moderation.reload import LexiconReloader

log = logging.getLogger(__name__)

RETRY_S = 1.0
CHECK_S = 30.0
"""How often the stored value is looked at without a reload: a value lost with NATS's data is put back."""


async def stored(kv: KeyValue) -> bytes | None:
    try:
        entry = await kv.get(LEXICON_KEY)
    except KeyNotFoundError:
        return None
    return entry.value


async def publish(kv: KeyValue, data: bytes) -> bool:
    """Put `data` unless it is the value stored already (another replica, or our own restart, wrote the
    same lexicon): a worker then rebuilds nothing. True when a new value was written."""
    if await stored(kv) == data:
        return False
    await kv.put(LEXICON_KEY, data)
    return True


async def publish_forever(nats_url: str, replicas: int, lexicon: LexiconReloader, metrics: ModerationMetrics,
                          stop: asyncio.Event) -> None:
    """Keep the bucket's value the lexicon in use until `stop`: at start, after every reload, and when
    the value went missing. Failures are retried; input checks never wait on any of this."""
    nc = await connect_nats(nats_url, "kefu-moderation")
    try:
        kv: KeyValue | None = None
        sent: bytes | None = None
        while not stop.is_set():
            lexicon.swapped.clear()
            generation = lexicon.generation
            data: bytes | None
            try:
                data = encode(lexicon.matcher.lexicon)
            except LexiconWireError as error:
                # Moderation keeps checking input with it; the workers keep the last lexicon they had.
                log.error("lexicon generation %d cannot be published: %s", generation, error)
                metrics.lexicon_publishes.labels("failed").inc()
                data = sent
            try:
                if kv is None:
                    kv = await ensure_key_value(nc.jetstream(), bucket_config(replicas))
                if data is not None and (data != sent or await stored(kv) is None):
                    if await publish(kv, data):
                        log.info("lexicon generation %d published to the llm workers", generation)
                        metrics.lexicon_publishes.labels("ok").inc()
                    sent = data
            except (nats.errors.Error, TimeoutError, OSError) as error:
                log.warning("cannot publish the lexicon (retrying in %.0f s): %s", RETRY_S,
                            error or type(error).__name__)
                metrics.lexicon_publishes.labels("failed").inc()
                await _wait(stop, RETRY_S)
                continue
            await _wait_either(stop, lexicon.swapped, CHECK_S)
    finally:
        await close_nats(nc)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _wait_either(stop: asyncio.Event, swapped: asyncio.Event, seconds: float) -> None:
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(swapped.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
