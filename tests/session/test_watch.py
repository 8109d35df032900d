"""Watch over gRPC on port 0 and a real nats-server: replay after a position, then live, scoped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel
from services.session.metrics import SessionMetrics
from services.session.server import SessionServicer, create_server
from services.session.settings import SessionSettings
from services.session.store import SessionStore
from services.session.tokens import CL100K, TokenCounters

INTERNAL_TOKEN = "internal-test-token-0123456789abcdef"
"""The services' bearer credential in these tests (services.common.grpc_client)."""

ALICE = session_pb2.Principal(tenant="shop1", subject="alice", role="visitor")
BOB = session_pb2.Principal(tenant="shop1", subject="bob", role="visitor")
AGENT = session_pb2.Principal(tenant="shop1", subject="agent-7", role="agent")
OTHER_TENANT_AGENT = session_pb2.Principal(tenant="shop2", subject="agent-7", role="agent")


@pytest.fixture
async def stub(nats_client: NatsClient) -> AsyncIterator[session_pb2_grpc.SessionServiceStub]:
    counters = TokenCounters(CL100K)
    settings = SessionSettings(grpc_port=0, internal_token=INTERNAL_TOKEN)
    metrics = SessionMetrics()
    store = await SessionStore.open(nats_client, counters.default_counter, max_history=50,
                                    max_message_chars=1000, ttl_s=3600)
    server, _, port = await create_server(settings, SessionServicer(settings, store, counters, metrics), metrics)
    await server.start()
    try:
        async with internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN) as channel:
            yield session_pb2_grpc.SessionServiceStub(channel)
    finally:
        await server.stop(None)


async def _append(stub: session_pb2_grpc.SessionServiceStub, session_id: str, text: str) -> session_pb2.Message:
    response = await stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=session_id, role="user",
                                                           content=text))
    return response.message


async def _next(call: grpc.aio.UnaryStreamCall) -> session_pb2.Message:
    response = await asyncio.wait_for(call.read(), 5)
    assert response is not grpc.aio.EOF
    return response.message


async def test_watch_replays_after_seq_then_follows_live_appends(stub: session_pb2_grpc.SessionServiceStub) -> None:
    created = await stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="one"))
    session_id = created.session_id
    # Another session's messages in the same stream must not show up.
    await stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="elsewhere"))
    two = await _append(stub, session_id, "two")
    three = await _append(stub, session_id, "three")
    call = stub.Watch(session_pb2.WatchRequest(principal=ALICE, session_id=session_id,
                                               after_seq=created.message.seq))
    try:
        assert [(m.content, m.seq) for m in (await _next(call), await _next(call))] == [
            ("two", two.seq), ("three", three.seq)]
        four = await _append(stub, session_id, "four")
        live = await _next(call)
        assert (live.content, live.seq, live.id, live.role) == ("four", four.seq, four.id, "user")
    finally:
        call.cancel()


async def test_watch_from_zero_sends_every_kept_message_and_staff_may_watch(
        stub: session_pb2_grpc.SessionServiceStub) -> None:
    created = await stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="one"))
    await _append(stub, created.session_id, "two")
    call = stub.Watch(session_pb2.WatchRequest(principal=AGENT, session_id=created.session_id))
    try:
        assert [(await _next(call)).content for _ in range(2)] == ["one", "two"]
    finally:
        call.cancel()


async def test_watch_after_the_last_seq_waits_for_the_next_message(stub: session_pb2_grpc.SessionServiceStub) -> None:
    created = await stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="one"))
    call = stub.Watch(session_pb2.WatchRequest(principal=ALICE, session_id=created.session_id,
                                               after_seq=created.message.seq))
    try:
        assert ("kefu-watch", "on") in tuple(await asyncio.wait_for(call.initial_metadata(), 5))
        nothing = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.2)
        assert not nothing.done()
        two = await _append(stub, created.session_id, "two")
        response = await asyncio.wait_for(nothing, 5)
        assert response.message.seq == two.seq
    finally:
        call.cancel()


@pytest.mark.parametrize("principal", [BOB, OTHER_TENANT_AGENT])
async def test_watch_of_someone_elses_session_is_not_found(stub: session_pb2_grpc.SessionServiceStub,
                                                          principal: session_pb2.Principal) -> None:
    created = await stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="secret"))
    for session_id in (created.session_id, "0" * 32, "not-an-id"):
        call = stub.Watch(session_pb2.WatchRequest(principal=principal, session_id=session_id))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(call.read(), 5)
        assert error.value.code() is grpc.StatusCode.NOT_FOUND


async def test_watch_cancel_removes_its_consumer(stub: session_pb2_grpc.SessionServiceStub,
                                                 nats_client: NatsClient) -> None:
    created = await stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="one"))
    js = nats_client.jetstream()
    before = (await js.stream_info("KEFU_MESSAGES")).state.consumer_count
    call = stub.Watch(session_pb2.WatchRequest(principal=ALICE, session_id=created.session_id))
    await _next(call)
    assert (await js.stream_info("KEFU_MESSAGES")).state.consumer_count == before + 1
    call.cancel()
    for _ in range(100):
        if (await js.stream_info("KEFU_MESSAGES")).state.consumer_count == before:
            break
        await asyncio.sleep(0.05)
    assert (await js.stream_info("KEFU_MESSAGES")).state.consumer_count == before
