"""A page of the agent queue reads the queue markers from the start, not every waiting entry (issue 19)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from nats.aio.client import Client as NatsClient
from nats.js.errors import NotFoundError

from kefu.session.v1 import session_pb2
from services.session.index import (
    INDEX_STREAM,
    INDEX_SUBJECT_PREFIX,
    ConversationIndex,
    ConversationSummary,
    MetaReader,
    QueueMarker,
    joined_key,
    status_key,
)
from services.session.listing import order
from services.session.models import ConversationState, SessionMeta
from services.session.queue_page import oldest_waiting
from tests.session.live_helpers import Live, principal
from tests.session.test_conversation_lists import listed

AGENT = principal("agent-1", "agent")


def waiting(tenant: str, since: float, version: int = 2, preview: str = "") -> SessionMeta:
    return SessionMeta(tenant, f"visitor-{since:g}", since, since, preview=preview,
                       state=ConversationState("waiting_human", version, since=since))


def claimed(meta: SessionMeta, at: float) -> SessionMeta:
    state = ConversationState("human", meta.state.version + 1, "agent-1", since=at)
    return replace(meta, state=state, updated_at=at)


def reading(meta: SessionMeta | None) -> MetaReader:
    async def reread() -> SessionMeta | None:
        return meta
    return reread


async def write(index: ConversationIndex, metas: list[SessionMeta]) -> list[str]:
    """New conversations indexed one after the other (join order is the order of writing)."""
    ids = []
    for meta in metas:
        session_id = uuid.uuid4().hex
        await index.add_new(meta.tenant, session_id, meta)
        ids.append(session_id)
    return ids


def first(page: list[ConversationSummary], limit: int) -> list[str]:
    return [s.session_id for s in order(page, "waiting_human")[:limit]]


async def has_marker(nc: NatsClient, tenant: str, session_id: str) -> bool:
    try:
        await nc.jetstream().get_last_msg(INDEX_STREAM, f"{INDEX_SUBJECT_PREFIX}.{joined_key(tenant, session_id)}")
    except NotFoundError:
        return False
    return True


async def test_a_queue_page_holds_the_first_to_join_without_reading_the_queue(nats_client: NatsClient) -> None:
    index = await ConversationIndex.open(nats_client, ttl_s=3600)
    # 600 waiting in shop1, among as many open with the AI, closed ones and another tenant's queue.
    metas = []
    for n in range(600):
        metas.append(waiting("shop1", 1000.0 + n))
        metas.append(replace(waiting("shop2" if n % 3 else "shop1", 1000.0 + n),
                             state=ConversationState("waiting_human" if n % 3 else ("ai", "closed")[n % 2],
                                                     2, since=1000.0 + n)))
    ids = await write(index, metas)
    queue = ids[0::2]
    # New previews of the 300 first to join rewrite their entries at the stream's end: the queue holds still.
    for session_id, meta in list(zip(queue, metas[0::2], strict=True))[:300]:
        updated = replace(meta, preview="still there?", updated_at=meta.updated_at + 5000)
        await index.project("shop1", session_id, updated, reading(updated), moved=False)

    page = await oldest_waiting(index, "shop1", 20)

    assert first(page, 20) == queue[:20]
    assert 20 <= len(page) < 60  # the markers at the queue's start, not the 600
    assert all(s.tenant == "shop1" and s.state.status == "waiting_human" for s in page)
    assert all(s.preview == "still there?" for s in page)
    everything = await index.in_status("shop1", "waiting_human")
    assert len(everything) == 600 and first(everything, 20) == first(page, 20)
    assert first(await oldest_waiting(index, "shop1", 1000), 1000) == queue


async def test_a_preview_does_not_move_a_conversation_in_the_queue(live: Live) -> None:
    queue = []
    for visitor in ("carol", "alice", "bob"):
        session_id = await live.open_conversation(principal(visitor))
        await live.transition(principal(visitor), session_id, "handoff")
        queue.append(session_id)
    await live.stub.Append(session_pb2.AppendRequest(
        principal=principal("carol"), session_id=queue[0], role="user", content="hello again"))
    await live.store.flush()  # the preview reaches the index with the counters
    page = await listed(live, AGENT, "waiting_human", limit=2)
    assert [c.session_id for c in page] == queue[:2]
    assert page[0].preview == "hello again"


async def test_leaving_the_queue_takes_a_conversation_off_its_pages(live: Live) -> None:
    queue = []
    for visitor in ("carol", "alice", "bob"):
        session_id = await live.open_conversation(principal(visitor))
        await live.transition(principal(visitor), session_id, "handoff")
        queue.append(session_id)
    await live.transition(AGENT, queue[0], "claim")
    assert not await has_marker(live.nc, "shop1", queue[0])
    assert [c.session_id for c in await listed(live, AGENT, "waiting_human", limit=1)] == [queue[1]]
    # Released back to the queue, it joins at its end.
    await live.transition(AGENT, queue[0], "release_queue")
    assert await has_marker(live.nc, "shop1", queue[0])
    assert [c.session_id for c in await listed(live, AGENT, "waiting_human")] == [queue[1], queue[2], queue[0]]


async def test_a_filter_nothing_passes_reads_to_the_queue_end(nats_client: NatsClient) -> None:
    index = await ConversationIndex.open(nats_client, ttl_s=3600)
    ids = await write(index, [waiting("shop1", 1.0 + n) for n in range(300)])
    assert await oldest_waiting(index, "shop1", 10, lambda s: s.state.assignee == "agent-1") == []
    last = await oldest_waiting(index, "shop1", 10, lambda s: s.session_id == ids[-1])
    assert [s.session_id for s in last] == [ids[-1]]
    assert await oldest_waiting(index, "shop2", 10) == []


async def test_a_delete_purges_the_marker(live: Live) -> None:
    alice = principal("alice")
    session_id = await live.open_conversation(alice)
    await live.transition(alice, session_id, "handoff")
    assert await has_marker(live.nc, "shop1", session_id)
    await live.stub.DeleteSession(session_pb2.DeleteSessionRequest(principal=alice, session_id=session_id))
    assert not await has_marker(live.nc, "shop1", session_id)
    assert await listed(live, AGENT, "waiting_human") == []


async def test_readers_skip_dangling_and_stale_markers_and_see_a_late_one(nats_client: NatsClient) -> None:
    index = await ConversationIndex.open(nats_client, ttl_s=3600)
    kv = await nats_client.jetstream().key_value("kefu_conversations")
    metas = [waiting("shop1", 100.0 + n / 50) for n in range(30)]
    ids = await write(index, metas)
    # Mid-move: the first one's human entry is written, its waiting entry and marker not yet purged.
    moved = ConversationSummary.of(ids[0], claimed(metas[0], 200.0))
    await kv.put(status_key("shop1", "human", ids[0]), moved.to_json())
    # Dangling: the second one's status entry is gone (a failed create), its marker not.
    gone = status_key("shop1", "waiting_human", ids[1])
    await nats_client.jetstream().purge_stream(INDEX_STREAM, subject=f"{INDEX_SUBJECT_PREFIX}.{gone}")
    # Late: a projection that joined before the first landed after the thirty (joined within JOIN_SKEW_S).
    late_meta = waiting("shop1", 99.5)
    late = uuid.uuid4().hex
    await kv.put(status_key("shop1", "waiting_human", late), ConversationSummary.of(late, late_meta).to_json())
    await kv.put(joined_key("shop1", late), QueueMarker.of(late_meta.state).to_json())

    page = await oldest_waiting(index, "shop1", 5)
    assert first(page, 5) == [late, *ids[2:6]]


async def test_a_page_read_racing_moves_shows_only_waiting_entries_once(nats_client: NatsClient) -> None:
    index = await ConversationIndex.open(nats_client, ttl_s=3600)
    other_replica = await ConversationIndex.open(nats_client, ttl_s=3600)
    metas = [waiting("shop1", 100.0 + n) for n in range(60)]
    ids = await write(index, metas)
    leaving = list(zip(ids[:40:2], metas[:40:2], strict=True))

    async def claim_all() -> None:
        for session_id, meta in leaving:
            # Two replicas project the same conversation: a stale one (still waiting) and the claim.
            now = claimed(meta, 300.0)
            await asyncio.gather(index.project("shop1", session_id, meta, reading(now)),
                                 other_replica.project("shop1", session_id, now, reading(now)))

    pages: list[list[ConversationSummary]] = []

    async def read_pages() -> None:
        for _ in range(20):
            pages.append(await oldest_waiting(index, "shop1", 10))

    await asyncio.gather(claim_all(), read_pages())
    for page in pages:
        assert all(s.state.status == "waiting_human" for s in page)
        assert len({s.session_id for s in page}) == len(page) >= 10
    settled = await oldest_waiting(index, "shop1", 10)
    assert first(settled, 10) == ids[1:40:2][:10]
    assert not any([await has_marker(nats_client, "shop1", session_id) for session_id, _ in leaving])
    assert all([await has_marker(nats_client, "shop1", session_id) for session_id in ids[1:40:2]])


async def test_a_start_gives_unmarked_waiting_conversations_their_markers_in_join_order(
        nats_client: NatsClient) -> None:
    index = await ConversationIndex.open(nats_client, ttl_s=3600)
    kv = await nats_client.jetstream().key_value("kefu_conversations")
    # Stored before queue markers existed: status entries only, written in another order than they joined.
    unmarked = {uuid.uuid4().hex: waiting("shop1", 100.0 + n) for n in (3, 1, 4, 0, 2)}
    for session_id, meta in unmarked.items():
        entry = ConversationSummary.of(session_id, meta)
        await kv.put(status_key("shop1", "waiting_human", session_id), entry.to_json())
    marked = await write(index, [waiting("shop1", 99.0)])
    ai = await write(index, [replace(waiting("shop1", 98.0), state=ConversationState("ai", 1, since=98.0))])

    assert await index.mark_waiting() == 5
    assert await index.mark_waiting() == 0  # a later start writes nothing
    assert not await has_marker(nats_client, "shop1", ai[0])
    in_join_order = [marked[0], *sorted(unmarked, key=lambda s: unmarked[s].state.since)]
    assert first(await oldest_waiting(index, "shop1", 3), 3) == in_join_order[:3]
    assert first(await oldest_waiting(index, "shop1", 100), 100) == in_join_order
