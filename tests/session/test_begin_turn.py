"""BeginTurn on a real nats-server: one call stores the visitor's turn and builds its context; an ordinary
message costs one JetStream write, its counters follow in one write a second (issue 20 items 3 and 5)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from nats.aio.client import Client as NatsClient

from kefu.session.v1 import session_pb2
from services.common.conversation_log import LOG_STREAM
from services.session.store import META_STREAM, meta_key
from tests.session.live_helpers import Live, principal, refused

ALICE = principal("alice")
MALLORY = principal("mallory")
AGENT = principal("agent-1", "agent")
SYSTEM = "You are the shop's assistant."


def turn(text: str, session_id: str = "", **fields: object) -> session_pb2.BeginTurnRequest:
    return session_pb2.BeginTurnRequest(principal=ALICE, session_id=session_id, content=text,
                                        system_prompt=SYSTEM, **fields)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def history_reads(nc: NatsClient) -> AsyncIterator[list[bytes]]:
    """Every direct get of the conversation log while the block runs (a plain subscriber sees the requests)."""
    seen: list[bytes] = []

    async def count(message: object) -> None:
        seen.append(getattr(message, "data", b""))

    subscription = await nc.subscribe(f"$JS.API.DIRECT.GET.{LOG_STREAM}", cb=count)
    await nc.flush()
    try:
        yield seen
    finally:
        await nc.flush()
        await subscription.unsubscribe()


async def stream_writes(nc: NatsClient) -> int:
    """Messages ever stored in every stream of the account: each is one JetStream write."""
    return sum(int(info.state.last_seq or 0) for info in await nc.jetstream().streams_info())


async def test_begin_turn_new_conversation_reads_no_history_and_creates_its_counters(live: Live) -> None:
    writes = await stream_writes(live.nc)
    async with history_reads(live.nc) as reads:
        begun = await live.stub.BeginTurn(turn("我的订单到哪了？"))
    assert reads == []  # a first message is its own history
    stored = begun.stored
    assert stored.created and stored.state.status == "ai" and stored.message.role == "user"
    assert [(m.role, m.content) for m in begun.context.messages] == [("system", SYSTEM), ("user", "我的订单到哪了？")]
    assert begun.context.user_message_count == 1 and begun.context.total_tokens > 0
    entry = await (await live.nc.jetstream().key_value("kefu_sessions")).get(meta_key("shop1", stored.session_id))
    assert b'"message_count": 1' in (entry.value or b"") and b'"user_message_count": 1' in (entry.value or b"")
    # Index entries (2), the message, the metadata with its counters (this fixture arms no timers).
    assert await stream_writes(live.nc) - writes == 4
    subject = f"$KV.kefu_sessions.shop1.{stored.session_id}"
    info = await live.nc.jetstream().stream_info(META_STREAM, subjects_filter=subject)
    assert info.state.subjects == {subject: 1}


async def test_begin_turn_next_turn_has_the_conversation_as_context(live: Live) -> None:
    first = await live.stub.BeginTurn(turn("hello"))
    session_id = first.stored.session_id
    await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=session_id, role="assistant",
                                                     content="Hi, how can I help?",
                                                     if_version=first.stored.state.version))
    second = await live.stub.BeginTurn(turn("where is my parcel?", session_id))
    assert not second.stored.created and second.stored.message.seq > first.stored.message.seq
    assert [(m.role, m.content) for m in second.context.messages] == [
        ("system", SYSTEM), ("user", "hello"), ("assistant", "Hi, how can I help?"), ("user", "where is my parcel?")]
    assert second.context.user_message_count == 2
    budget = await live.stub.BeginTurn(turn("and the invoice?", session_id, max_tokens=40))
    assert budget.context.truncated and budget.context.messages[-1].content == "and the invoice?"


async def test_begin_turn_builds_no_context_when_nobody_asks_the_model(live: Live) -> None:
    first = await live.stub.BeginTurn(turn("hello", store_only=True))
    assert first.stored.created and not first.HasField("context")
    session_id = first.stored.session_id
    await live.transition(AGENT, session_id, "claim")
    held = await live.stub.BeginTurn(turn("are you a human?", session_id))
    assert held.stored.state.status == "human" and not held.HasField("context")
    again = await live.stub.BeginTurn(turn("are you a human?", session_id, message_id=held.stored.message.id))
    assert again.stored.duplicate and again.stored.message.seq == held.stored.message.seq
    assert not again.HasField("context")
    assert [m.content for m in await live.messages(ALICE, session_id) if m.kind == "message"] == [
        "hello", "are you a human?"]


async def test_begin_turn_is_scoped_to_the_owner_and_bounded(live: Live) -> None:
    session_id = (await live.stub.BeginTurn(turn("mine"))).stored.session_id
    stranger = session_pb2.BeginTurnRequest(principal=MALLORY, session_id=session_id, content="let me in")
    await refused(live.stub.BeginTurn(stranger), grpc.StatusCode.NOT_FOUND)
    other_tenant = session_pb2.BeginTurnRequest(principal=principal("alice", tenant="shop2"), session_id=session_id,
                                                content="same sub, other tenant")
    await refused(live.stub.BeginTurn(other_tenant), grpc.StatusCode.NOT_FOUND)
    await refused(live.stub.BeginTurn(turn("x" * 1001, session_id)), grpc.StatusCode.INVALID_ARGUMENT)
    await refused(live.stub.BeginTurn(turn("", session_id)), grpc.StatusCode.INVALID_ARGUMENT)
    assert [m.content for m in await live.messages(ALICE, session_id)] == ["mine"]


async def test_begin_turn_ordinary_messages_cost_one_write_each_and_one_for_their_counters(live: Live) -> None:
    session_id = (await live.stub.BeginTurn(turn("hello"))).stored.session_id
    await live.store.flush()
    writes = await stream_writes(live.nc)
    for n in range(5):
        await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=session_id, role="user",
                                                         content=f"message {n}"))
    assert await stream_writes(live.nc) - writes == 5  # the log's five; the counters are still pending
    listed = await live.stub.ListConversations(session_pb2.ListConversationsRequest(principal=ALICE))
    assert [c.preview for c in listed.conversations] == ["message 4"]  # this process's reads include them
    await asyncio.sleep(1.5)  # the window (a second) passes: one write with every counter of it
    assert await stream_writes(live.nc) - writes == 6
    entry = await (await live.nc.jetstream().key_value("kefu_sessions")).get(meta_key("shop1", session_id))
    assert b'"message_count": 6' in (entry.value or b"") and b'"preview": "message 4"' in (entry.value or b"")
