"""Duplicate windows on a real nats-server (issue 19): only KEFU_MESSAGES deduplicates (a retried append
with the same message id), so every other stream of the session keeps a 1-second window, and nats-server
does not read back two minutes of their writes at each start. Stores created before get narrowed."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig

from services.common.conversation_log import LOG_STREAM
from services.common.nats_client import SHORT_DUPLICATE_WINDOW_S, ensure_key_value
from services.session.index import INDEX_BUCKET
from services.session.schedule import TIMERS_PREFIX, TIMERS_STREAM, TimerLimits, TimerSchedule
from services.session.store import MAX_DUPLICATE_WINDOW_S, META_BUCKET, SessionStore
from services.session.tokens import CL100K, TokenCounters

LIMITS = TimerLimits(wait_s=60, idle_s=600, retention_s=3600)


async def windows(nc: NatsClient) -> dict[str, float | None]:
    return {info.config.name or "": info.config.duplicate_window for info in await nc.jetstream().streams_info()}


async def open_session_streams(nc: NatsClient) -> None:
    schedule = await TimerSchedule.open(nc, LIMITS)
    store = await SessionStore.open(nc, TokenCounters(CL100K).default_counter, max_history=200,
                                    max_message_chars=1000, ttl_s=3600, schedule=schedule)
    await store.close()


async def test_only_the_conversation_log_keeps_a_duplicate_window(nats_client: NatsClient) -> None:
    await open_session_streams(nats_client)
    found = await windows(nats_client)
    assert found[f"KV_{META_BUCKET}"] == SHORT_DUPLICATE_WINDOW_S == 1.0
    assert found[f"KV_{INDEX_BUCKET}"] == SHORT_DUPLICATE_WINDOW_S
    assert found[TIMERS_STREAM] == SHORT_DUPLICATE_WINDOW_S
    assert found[LOG_STREAM] == MAX_DUPLICATE_WINDOW_S == 120.0


async def test_a_store_created_with_the_two_minute_default_is_narrowed(nats_client: NatsClient) -> None:
    js = nats_client.jetstream()
    # As an older kefu created them: nats-py's default window for buckets, the server's for the timers.
    for bucket in (META_BUCKET, INDEX_BUCKET):
        await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, ttl=3600, storage=StorageType.FILE))
    await js.add_stream(StreamConfig(name=TIMERS_STREAM, subjects=[f"{TIMERS_PREFIX}.>"],
                                     retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                                     max_msgs_per_subject=1, allow_msg_schedules=True))
    before = await windows(nats_client)
    assert {before[f"KV_{META_BUCKET}"], before[f"KV_{INDEX_BUCKET}"], before[TIMERS_STREAM]} == {120.0}
    await open_session_streams(nats_client)
    after = await windows(nats_client)
    assert after[f"KV_{META_BUCKET}"] == after[f"KV_{INDEX_BUCKET}"] == after[TIMERS_STREAM] == 1.0


async def test_a_bucket_is_narrowed_by_whoever_creates_it_and_only_opened_by_the_others(
        nats_client: NatsClient) -> None:
    js = nats_client.jetstream()
    await ensure_key_value(js, KeyValueConfig(bucket="fresh", history=1, storage=StorageType.FILE))
    await js.create_key_value(KeyValueConfig(bucket="older", history=1, storage=StorageType.FILE))
    # A reader (no STREAM.UPDATE permission in production) leaves an existing bucket as it is.
    await ensure_key_value(js, KeyValueConfig(bucket="older", history=1, storage=StorageType.FILE))
    found = await windows(nats_client)
    assert found["KV_fresh"] == 1.0
    assert found["KV_older"] == 120.0
    # A bucket whose max age is shorter than the window gets its max age (the server refuses more).
    await ensure_key_value(js, KeyValueConfig(bucket="short", history=1, ttl=0.5, storage=StorageType.FILE))
    assert (await windows(nats_client))["KV_short"] == 0.5
