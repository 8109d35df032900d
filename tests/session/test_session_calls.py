"""SessionService.Calls over real gRPC and a real nats-server: id-tagged calls on one stream, each under its
own deadline, scoped and refused exactly as its unary RPC (issue 20 item 5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel
from services.session.limits import VisitorRates
from services.session.metrics import SessionMetrics
from services.session.server import SessionServicer, create_server
from services.session.settings import SessionSettings
from services.session.store import SessionStore
from services.session.tokens import TokenCounters
from tests.session.conftest import INTERNAL_TOKEN
from tests.session.live_helpers import Live, principal
from tests.session.pause_helpers import paused

ALICE = principal("alice")
BOB = principal("bob")
CAROL = principal("carol")
SHOP2_ALICE = principal("alice", tenant="shop2")
SHOP2_AGENT = principal("agent-9", "agent", tenant="shop2")
AGENT_1 = principal("agent-1", "agent")


class RawCalls:
    """One Calls stream driven by hand: batches out, results collected by id."""

    def __init__(self, stub: session_pb2_grpc.SessionServiceStub) -> None:
        self.call = stub.Calls()
        self.results: dict[int, session_pb2.SessionResult] = {}
        self.batches = 0

    async def send(self, *calls: session_pb2.SessionCall) -> None:
        await self.call.write(session_pb2.SessionCallBatch(calls=list(calls)))

    async def collect(self, *ids: int, timeout_s: float = 10.0) -> dict[int, session_pb2.SessionResult]:
        async with asyncio.timeout(timeout_s):
            while not set(ids) <= set(self.results):
                await self.read_one()
        return {i: self.results[i] for i in ids}

    async def read_one(self) -> None:
        batch = await self.call.read()
        assert isinstance(batch, session_pb2.SessionResultBatch), batch
        self.batches += 1
        for result in batch.results:
            assert result.id not in self.results, f"two results for call {result.id}"
            self.results[result.id] = result

    async def nothing_more(self, quiet_s: float) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(quiet_s):
                await self.read_one()


@pytest.fixture
async def calls(live: Live) -> AsyncIterator[RawCalls]:
    raw = RawCalls(live.stub)
    try:
        yield raw
    finally:
        raw.call.cancel()  # leaving the stream does not end it (NOTES.md §5)


async def open_for(server: Server, who: session_pb2.Principal) -> str:
    opened = await server.stub.Append(session_pb2.AppendRequest(principal=who, role="user", content="first"))
    return str(opened.session_id)


def begin(call_id: int, who: session_pb2.Principal, text: str, session_id: str = "",
          deadline_ms: int = 5000) -> session_pb2.SessionCall:
    return session_pb2.SessionCall(id=call_id, deadline_ms=deadline_ms, begin_turn=session_pb2.BeginTurnRequest(
        principal=who, session_id=session_id, content=text, store_only=True))


def nats_paused(nats_server: NatsServer) -> AbstractContextManager[None]:
    """The nats-server process stopped: every JetStream write waits until it resumes."""
    return paused(nats_server.process.pid)


async def test_calls_interleave_on_one_stream_and_come_back_by_id(live: Live, calls: RawCalls) -> None:
    conversations = {who.subject: await live.open_conversation(who) for who in (ALICE, BOB, CAROL)}
    sent = {
        17: (ALICE, "alice one"), 3: (BOB, "bob one"), 99: (CAROL, "carol one"),
        4: (ALICE, "alice two"), 1000: (BOB, "bob two"), 5: (CAROL, "carol two"),
    }
    ids = list(sent)
    await calls.send(*(begin(i, sent[i][0], sent[i][1], conversations[sent[i][0].subject]) for i in ids[:3]))
    await calls.send(*(begin(i, sent[i][0], sent[i][1], conversations[sent[i][0].subject]) for i in ids[3:]),
                     begin(8, ALICE, "already late", conversations["alice"], deadline_ms=0))
    results = await calls.collect(*ids, 8)
    for call_id, (who, text) in sent.items():
        stored = results[call_id].begin_turn.stored
        assert results[call_id].WhichOneof("result") == "begin_turn", results[call_id]
        assert (stored.session_id, stored.message.content) == (conversations[who.subject], text)
    assert results[8].status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    # Each conversation holds its two messages in the order the stream carried them (and not the late one).
    for who in (ALICE, BOB, CAROL):
        texts = [m.content for m in await live.messages(who, conversations[who.subject])]
        assert texts == ["hello", f"{who.subject} one", f"{who.subject} two"]
    # An append goes over the same stream.
    await calls.send(session_pb2.SessionCall(id=6, deadline_ms=5000, append=session_pb2.AppendRequest(
        principal=ALICE, session_id=conversations["alice"], role="user", content="appended")))
    appended = (await calls.collect(6))[6].append
    assert appended.message.content == "appended" and appended.session_id == conversations["alice"]


async def test_calls_a_deadline_expires_alone_and_the_stream_goes_on(
        live: Live, calls: RawCalls, nats_server: NatsServer) -> None:
    conversation = await live.open_conversation(ALICE)
    with nats_paused(nats_server):
        await calls.send(begin(1, ALICE, "stuck behind a paused NATS", conversation, deadline_ms=300))
        late = (await calls.collect(1))[1]
    assert late.WhichOneof("result") == "status"
    assert (late.status.code, late.status.message) == (grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
                                                       "Deadline Exceeded")
    await calls.send(begin(2, ALICE, "after", conversation))
    after = (await calls.collect(2))[2]
    assert after.begin_turn.stored.message.content == "after"


async def test_calls_a_cancelled_call_gets_no_result_and_the_stream_goes_on(
        live: Live, calls: RawCalls, nats_server: NatsServer) -> None:
    conversation = await live.open_conversation(ALICE)
    with nats_paused(nats_server):
        await calls.send(begin(1, ALICE, "given up", conversation))
        await calls.send(session_pb2.SessionCall(id=1, cancel=True))
        await asyncio.sleep(0.2)
    await calls.send(begin(2, ALICE, "kept", conversation))
    assert (await calls.collect(2))[2].begin_turn.stored.message.content == "kept"
    await calls.nothing_more(0.5)
    assert 1 not in calls.results


async def test_calls_another_tenants_conversation_is_refused_per_call_as_unary(live: Live, calls: RawCalls) -> None:
    conversation = await live.open_conversation(ALICE)
    intrusions = {
        1: session_pb2.SessionCall(id=1, deadline_ms=5000, begin_turn=session_pb2.BeginTurnRequest(
            principal=SHOP2_ALICE, session_id=conversation, content="mine?")),
        2: session_pb2.SessionCall(id=2, deadline_ms=5000, append=session_pb2.AppendRequest(
            principal=SHOP2_AGENT, session_id=conversation, role="agent", content="hi")),
    }
    await calls.send(*intrusions.values(), begin(3, ALICE, "the owner's", conversation))
    results = await calls.collect(1, 2, 3)
    assert results[3].begin_turn.stored.message.content == "the owner's"
    unary: list[grpc.aio.AioRpcError] = []
    for request in (intrusions[1].begin_turn, intrusions[2].append):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            if isinstance(request, session_pb2.BeginTurnRequest):
                await live.stub.BeginTurn(request)
            else:
                await live.stub.Append(request)
        unary.append(refused.value)
    for call_id, error in zip((1, 2), unary, strict=True):
        status = results[call_id].status
        assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
        assert (status.code, status.message) == (error.code().value[0], error.details())
    texts = [m.content for m in await live.messages(ALICE, conversation)]
    assert texts == ["hello", "the owner's"]


@dataclass
class Server:
    calls: RawCalls
    servicer: SessionServicer
    stub: session_pb2_grpc.SessionServiceStub


@pytest.fixture
async def server(nats_client: NatsClient, live_counters: TokenCounters) -> AsyncIterator[Server]:
    """A session service whose visitors may send a burst of 2, then one message per 2 s."""
    settings = SessionSettings(grpc_port=0, internal_token=INTERNAL_TOKEN)
    metrics = SessionMetrics()
    store = await SessionStore.open(nats_client, live_counters.default_counter, max_history=200,
                                    max_message_chars=1000, ttl_s=3600)
    rates = await VisitorRates.open(nats_client, rate=0.5, burst=2)
    servicer = SessionServicer(settings, store, live_counters, metrics, rates)
    grpc_server, _, port = await create_server(settings, servicer, metrics)
    await grpc_server.start()
    channel = internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN)
    stub = session_pb2_grpc.SessionServiceStub(channel)
    raw = RawCalls(stub)
    try:
        yield Server(raw, servicer, stub)
    finally:
        raw.call.cancel()
        await channel.close()
        await grpc_server.stop(None)
        await store.close()


async def test_calls_a_rate_limited_call_carries_its_retry_after_while_others_pass(server: Server) -> None:
    rated = server.calls
    await rated.send(begin(1, ALICE, "one"), begin(2, ALICE, "two"), begin(3, ALICE, "three"), begin(4, BOB, "bob"))
    results = await rated.collect(1, 2, 3, 4)
    assert [results[i].WhichOneof("result") for i in (1, 2, 3, 4)].count("begin_turn") == 3
    refused = [r for r in results.values() if r.WhichOneof("result") == "status"]
    assert len(refused) == 1 and refused[0].id in (1, 2, 3)  # Alice's three race for her two tokens
    status = refused[0].status
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert dict(status.trailers) == {"kefu-error": "rate_limited", "retry-after": "2"}
    assert results[4].begin_turn.stored.message.content == "bob"


async def test_calls_a_stopping_server_finishes_its_calls_refuses_new_ones_unrun_and_ends_the_stream(
        server: Server, nats_server: NatsServer) -> None:
    calls = server.calls
    conversation = (await server.stub.Append(session_pb2.AppendRequest(
        principal=AGENT_1, role="agent", content="hello", session_id=await open_for(server, ALICE)))).session_id
    with nats_paused(nats_server):
        await calls.send(begin(1, ALICE, "in flight", conversation))
        await asyncio.sleep(0.1)
        server.servicer.drain()
        await calls.send(begin(2, ALICE, "too late", conversation))
        refused = (await calls.collect(2))[2]
    assert refused.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert dict(refused.status.trailers) == {"kefu-error": "draining"}
    assert (await calls.collect(1))[1].begin_turn.stored.message.content == "in flight"
    assert await calls.call.read() is grpc.aio.EOF  # the stream ends once its calls finished
    assert await calls.call.code() is grpc.StatusCode.OK
    listed = await server.stub.ListMessages(session_pb2.ListMessagesRequest(principal=ALICE, session_id=conversation))
    assert [m.content for m in listed.messages] == ["first", "hello", "in flight"]
