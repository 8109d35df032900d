"""The edge's call streams (gateway/call_streams.py) against the real session and moderation servers over
gRPC and a real nats-server: batching, per-call deadlines, cancellation, and errors as the unary path's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from gateway.call_streams import TurnCalls
from gateway.clients import CHANNEL_OPTIONS
from gateway.errors import api_error_from_grpc
from kefu.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel
from services.moderation.metrics import ModerationMetrics
from services.moderation.reload import LexiconReloader
from services.moderation.server import ModerationServicer
from services.moderation.server import create_server as create_moderation_server
from services.moderation.settings import ModerationSettings
from services.session.limits import VisitorRates
from services.session.metrics import SessionMetrics
from services.session.server import SessionServicer
from services.session.server import create_server as create_session_server
from services.session.settings import SessionSettings
from services.session.store import SessionStore
from services.session.tokens import CL100K, TokenCounters
from tests.moderation.lexicon_helpers import write_files
from tests.session.pause_helpers import paused

TOKEN = "internal-test-token-0123456789abcdef"
LEXICON = {"fruit.txt": "# action: mask\n苹果\n", "fraud.txt": "刷单返利\n"}
ALICE = session_pb2.Principal(tenant="shop1", subject="alice", role="visitor")
AGENT = session_pb2.Principal(tenant="shop1", subject="ann", role="agent")
INTRUDER = session_pb2.Principal(tenant="shop2", subject="mallory", role="agent")


@dataclass
class Backends:
    calls: TurnCalls
    session: session_pb2_grpc.SessionServiceStub
    moderation: moderation_pb2_grpc.ModerationServiceStub


@pytest.fixture
async def backends(nats_client: NatsClient, tmp_path: Path) -> AsyncIterator[Backends]:
    counters = TokenCounters(CL100K)
    session_settings = SessionSettings(grpc_port=0, internal_token=TOKEN)
    session_metrics = SessionMetrics()
    store = await SessionStore.open(nats_client, counters.default_counter, max_history=200,
                                    max_message_chars=1000, ttl_s=3600)
    rates = await VisitorRates.open(nats_client, rate=0.5, burst=3)
    session_server, _, session_port = await create_session_server(
        session_settings, SessionServicer(session_settings, store, counters, session_metrics, rates), session_metrics)
    write_files(tmp_path / "lexicon", LEXICON)
    moderation_metrics = ModerationMetrics()
    moderation_settings = ModerationSettings(grpc_port=0, metrics_port=0, lexicon_dir=tmp_path / "lexicon",
                                             max_text_chars=100, internal_token=TOKEN)
    moderation_server, _, moderation_port = await create_moderation_server(moderation_settings, ModerationServicer(
        moderation_settings, LexiconReloader.load(tmp_path / "lexicon", moderation_metrics), moderation_metrics),
        moderation_metrics)
    await session_server.start()
    await moderation_server.start()
    session_channel = internal_channel(f"127.0.0.1:{session_port}", TOKEN)
    moderation_channel = internal_channel(f"127.0.0.1:{moderation_port}", TOKEN)
    session = session_pb2_grpc.SessionServiceStub(session_channel)
    moderation = moderation_pb2_grpc.ModerationServiceStub(moderation_channel)
    calls = TurnCalls(session, moderation, streams=1)
    try:
        yield Backends(calls, session, moderation)
    finally:
        await calls.close()
        await session_channel.close()
        await moderation_channel.close()
        await session_server.stop(None)
        await moderation_server.stop(None)
        await store.close()


def nats_paused(nats_server: NatsServer) -> AbstractContextManager[None]:
    """The nats-server process stopped: every JetStream write waits until it resumes."""
    return paused(nats_server.process.pid)


def begin(text: str, session_id: str = "", who: session_pb2.Principal = ALICE) -> session_pb2.BeginTurnRequest:
    return session_pb2.BeginTurnRequest(principal=who, session_id=session_id, content=text, store_only=True)


async def test_call_streams_calls_under_load_share_messages_and_get_their_own_results(backends: Backends) -> None:
    calls = backends.calls
    first = await calls.begin_turn(begin("first"), 5.0)
    conversation = first.stored.session_id
    agents = [calls.append(session_pb2.AppendRequest(principal=AGENT, session_id=conversation, role="agent",
                                                     content=f"reply {n}", kind="note"), 5.0) for n in range(40)]
    texts = [f"苹果 {n}" for n in range(40)]
    checks = [calls.check(moderation_pb2.CheckRequest(tenant="shop1", text=text), 5.0) for text in texts]
    writes_before = calls.session.writes
    appended, checked = await asyncio.gather(asyncio.gather(*agents), asyncio.gather(*checks))
    assert [a.message.content for a in appended] == [f"reply {n}" for n in range(40)]
    assert len({a.message.seq for a in appended}) == 40
    assert [c.masked_text for c in checked] == [f"** {n}" for n in range(40)]
    assert calls.session.writes - writes_before < 10  # 40 calls, a handful of messages
    assert calls.moderation.writes < 10
    assert (calls.session.opened, calls.moderation.opened) == (1, 1)
    assert (calls.session.pending, calls.moderation.pending) == (0, 0)


async def test_call_streams_refusals_raise_what_the_unary_calls_raise(backends: Backends) -> None:
    calls = backends.calls
    conversation = (await calls.begin_turn(begin("mine"), 5.0)).stored.session_id
    intrusion = session_pb2.AppendRequest(principal=INTRUDER, session_id=conversation, role="agent", content="x")
    too_long = moderation_pb2.CheckRequest(tenant="shop1", text="长" * 101)
    pairs = [
        (calls.append(intrusion, 5.0), backends.session.Append(intrusion, timeout=5.0), "session"),
        (calls.check(too_long, 5.0), backends.moderation.Check(too_long, timeout=5.0), "moderation"),
    ]
    for streamed, unary, backend in pairs:
        with pytest.raises(grpc.aio.AioRpcError) as by_stream:
            await streamed
        with pytest.raises(grpc.aio.AioRpcError) as by_unary:
            await unary
        assert (by_stream.value.code(), by_stream.value.details()) == (by_unary.value.code(), by_unary.value.details())
        mine, theirs = api_error_from_grpc(by_stream.value, backend), api_error_from_grpc(by_unary.value, backend)
        assert (mine.code, mine.status, str(mine), mine.headers) == (theirs.code, theirs.status, str(theirs),
                                                                     theirs.headers)
    # Alice's burst of 3 is spent by her third message: the rate limit comes with its Retry-After.
    await calls.begin_turn(begin("two", conversation), 5.0)
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        for _ in range(3):
            await calls.begin_turn(begin("more", conversation), 5.0)
    refusal = api_error_from_grpc(limited.value, "session")
    assert (limited.value.code(), refusal.code, refusal.status) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                    "rate_limited", 429)
    assert refusal.headers == {"Retry-After": "2"}
    assert (await calls.check(moderation_pb2.CheckRequest(tenant="shop1", text="刷单返利"), 5.0)).verdict == \
        moderation_pb2.VERDICT_BLOCK


async def test_call_streams_a_late_call_times_out_alone(backends: Backends, nats_server: NatsServer) -> None:
    calls = backends.calls
    conversation = (await calls.begin_turn(begin("hello"), 5.0)).stored.session_id
    with nats_paused(nats_server):
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await calls.append(session_pb2.AppendRequest(principal=AGENT, session_id=conversation, role="agent",
                                                         content="late", kind="note"), 0.3)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert api_error_from_grpc(late.value, "session").code == "session_unavailable"
        assert calls.session.pending == 0
    reply = await calls.append(session_pb2.AppendRequest(principal=AGENT, session_id=conversation, role="agent",
                                                         content="on time", kind="note"), 5.0)
    assert reply.message.content == "on time" and calls.session.opened == 1


async def test_call_streams_a_cancelled_caller_leaves_nothing_pending(backends: Backends,
                                                                      nats_server: NatsServer) -> None:
    calls = backends.calls
    conversation = (await calls.begin_turn(begin("hello"), 5.0)).stored.session_id
    with nats_paused(nats_server):
        caller = asyncio.create_task(calls.append(session_pb2.AppendRequest(
            principal=AGENT, session_id=conversation, role="agent", content="given up", kind="note"), 5.0))
        await asyncio.sleep(0.1)
        assert calls.session.pending == 1
        writes = calls.session.writes
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert calls.session.pending == 0
        await asyncio.sleep(0.1)
        assert calls.session.writes == writes + 1  # the cancel item went out
    reply = await calls.append(session_pb2.AppendRequest(principal=AGENT, session_id=conversation, role="agent",
                                                         content="next", kind="note"), 5.0)
    assert reply.message.content == "next" and calls.session.pending == 0


async def test_call_streams_a_closed_stream_fails_its_calls_unavailable(backends: Backends) -> None:
    calls = backends.calls
    await calls.check(moderation_pb2.CheckRequest(tenant="shop1", text="hi"), 5.0)
    await calls.close()
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await calls.check(moderation_pb2.CheckRequest(tenant="shop1", text="hi"), 5.0)
    assert api_error_from_grpc(closed.value, "moderation").code == "moderation_unavailable"


Replica = tuple[SessionServicer, SessionMetrics, grpc.aio.Server, int]


@pytest.fixture
async def two_replicas(nats_client: NatsClient) -> AsyncIterator[tuple[list[Replica], grpc.aio.Channel]]:
    """Two session replicas on one store, behind one round-robin channel (the edge's options)."""
    counters = TokenCounters(CL100K)
    settings = SessionSettings(grpc_port=0, internal_token=TOKEN)
    store = await SessionStore.open(nats_client, counters.default_counter, max_history=200,
                                    max_message_chars=1000, ttl_s=3600)
    replicas: list[Replica] = []
    for _ in range(2):
        metrics = SessionMetrics()
        servicer = SessionServicer(settings, store, counters, metrics)
        server, _, port = await create_session_server(settings, servicer, metrics)
        await server.start()
        replicas.append((servicer, metrics, server, port))
    channel = internal_channel(f"ipv4:127.0.0.1:{replicas[0][3]},127.0.0.1:{replicas[1][3]}", TOKEN,
                               CHANNEL_OPTIONS)
    try:
        yield replicas, channel
    finally:
        await channel.close()
        for _, _, server, _ in replicas:
            await server.stop(None)
        await store.close()


def appended(replica: Replica) -> float:
    return float(replica[1].messages_appended.labels("user")._value.get())


async def test_call_streams_spread_a_turns_calls_over_the_replicas(
        two_replicas: tuple[list[Replica], grpc.aio.Channel]) -> None:
    """KEFU_CALL_STREAMS streams per service, calls dealt in turn: both replicas serve, as with unary calls."""
    replicas, channel = two_replicas
    calls = TurnCalls(session_pb2_grpc.SessionServiceStub(channel), moderation_pb2_grpc.ModerationServiceStub(channel),
                      streams=4)
    try:
        for n in range(20):
            await calls.begin_turn(begin(f"turn {n}"), 5.0)
        served = [appended(replica) for replica in replicas]
        assert sum(served) == 20 and min(served) >= 5  # one stream would have sent all 20 to one replica
        assert calls.session.opened == 4 and calls.session.pending == 0
    finally:
        await calls.close()


async def test_call_streams_calls_arriving_together_share_one_streams_message(backends: Backends) -> None:
    """Dealt in turn, yet a burst goes on the stream gathering it: spreading never splits one write into four."""
    calls = TurnCalls(backends.session, backends.moderation, streams=4)
    try:
        texts = [f"苹果 {n}" for n in range(40)]
        checked = await asyncio.gather(*(calls.check(moderation_pb2.CheckRequest(tenant="shop1", text=text), 5.0)
                                         for text in texts))
        assert [c.masked_text for c in checked] == [f"** {n}" for n in range(40)]
        assert calls.moderation.writes < 4 and calls.moderation.opened == 1  # one per stream without the rule
        await calls.check(moderation_pb2.CheckRequest(tenant="shop1", text="next"), 5.0)
        assert calls.moderation.opened == 2  # alone, a call goes to the next stream
    finally:
        await calls.close()


async def test_call_streams_a_draining_server_hands_new_calls_to_another_replica(
        nats_server: NatsServer, two_replicas: tuple[list[Replica], grpc.aio.Channel]) -> None:
    """As in a rolling restart: the replica the stream is on stops; its call in flight finishes there, and the
    next call, refused unrun, is sent again and lands on the other replica over a new stream."""
    replicas, channel = two_replicas
    calls = TurnCalls(session_pb2_grpc.SessionServiceStub(channel), moderation_pb2_grpc.ModerationServiceStub(channel),
                      streams=1)
    try:
        conversation = (await calls.begin_turn(begin("hello"), 5.0)).stored.session_id
        first = [appended(replica) for replica in replicas].index(1.0)  # the replica the stream went to
        with nats_paused(nats_server):
            in_flight = asyncio.create_task(calls.begin_turn(begin("in flight", conversation), 5.0))
            await asyncio.sleep(0.1)
            replicas[first][0].drain()  # then it stops, as services/session/server.py's serve() does
            stopping = asyncio.create_task(replicas[first][2].stop(5))
            resent = asyncio.create_task(calls.begin_turn(begin("resent", conversation), 5.0))
            await asyncio.sleep(0.2)
        assert (await in_flight).stored.message.content == "in flight"
        assert (await resent).stored.message.content == "resent"
        await stopping
        assert appended(replicas[1 - first]) == 1.0 and calls.session.opened == 2
        assert (await calls.begin_turn(begin("next", conversation), 5.0)).stored.message.content == "next"
        assert calls.session.opened == 2 and calls.session.pending == 0
    finally:
        await calls.close()
