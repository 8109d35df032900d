"""ListConversations over gRPC: the queue's order, filters, tenant isolation, a visitor's own; the index behind it."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from kefu.session.v1 import session_pb2
from services.common.kv_values import live_values
from services.session.index import INDEX_BUCKET, INDEX_STREAM, INDEX_SUBJECT_PREFIX
from services.session.reads import last_per_subject
from tests.session.live_helpers import Live, principal, refused

ALICE = principal("alice")
BOB = principal("bob")
CAROL = principal("carol")
AGENT = principal("agent-1", "agent")
AGENT_2 = principal("agent-2", "agent")
SHOP2_VISITOR = principal("dave", tenant="shop2")
SHOP2_AGENT = principal("agent-9", "agent", tenant="shop2")


async def listed(live: Live, who: session_pb2.Principal, status: str = "", assignee: str = "",
                 limit: int = 0) -> list[session_pb2.ConversationSummary]:
    response = await live.stub.ListConversations(session_pb2.ListConversationsRequest(
        principal=who, status=status, assignee=assignee, limit=limit))
    return list(response.conversations)


async def index_keys(live: Live) -> set[str]:
    # Not kv.keys(): a KV watch's end marker can overtake keys already delivered (services/common/kv_values.py).
    return {value.key for value in await live_values(live.nc.jetstream(), INDEX_BUCKET, ">", timeout_s=5.0)}


async def test_lists_queue_is_oldest_first_with_the_newest_visitor_message(live: Live) -> None:
    queue = []
    for visitor in (CAROL, ALICE, BOB):
        session_id = await live.open_conversation(visitor, f"I am {visitor.subject}")
        await live.transition(visitor, session_id, "handoff")
        queue.append(session_id)
    await live.open_conversation(ALICE, "not queued")
    await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=queue[1], role="user",
                                                     content="anyone? " + "x" * 200))
    await live.store.flush()  # a waiting conversation's preview follows its counters, within a second
    waiting = await listed(live, AGENT, "waiting_human")
    assert [c.session_id for c in waiting] == queue
    assert [c.owner for c in waiting] == ["carol", "alice", "bob"]
    assert waiting[0].preview == "I am carol" and waiting[1].preview == ("anyone? " + "x" * 200)[:120]
    assert all(c.state.status == "waiting_human" and c.state.version == 2 for c in waiting)
    await live.transition(AGENT, queue[0], "claim")
    assert [c.session_id for c in await listed(live, AGENT, "waiting_human")] == queue[1:]


async def test_lists_default_is_every_open_status_newest_first(live: Live) -> None:
    in_ai = await live.open_conversation(ALICE)
    closed = await live.open_conversation(BOB)
    await live.transition(AGENT, closed, "close")
    held = await live.open_conversation(CAROL)
    await live.transition(AGENT, held, "claim")
    summaries = await listed(live, AGENT)
    assert [c.session_id for c in summaries] == [held, in_ai]
    assert [c.session_id for c in await listed(live, AGENT, "closed")] == [closed]
    assert [c.session_id for c in await listed(live, AGENT, limit=1)] == [held]


async def test_lists_filter_by_assignee(live: Live) -> None:
    mine = await live.open_conversation(ALICE)
    theirs = await live.open_conversation(BOB)
    await live.transition(AGENT, mine, "claim", assignee_name="One")
    await live.transition(AGENT_2, theirs, "claim")
    summaries = await listed(live, AGENT_2, "human", assignee="agent-1")
    assert [(c.session_id, c.state.assignee, c.state.assignee_name) for c in summaries] == [(mine, "agent-1", "One")]
    assert [c.session_id for c in await listed(live, AGENT, assignee="agent-2")] == [theirs]


async def test_lists_never_cross_tenants(live: Live) -> None:
    ours = await live.open_conversation(ALICE)
    theirs = await live.open_conversation(SHOP2_VISITOR)
    for session_id, who in ((ours, ALICE), (theirs, SHOP2_VISITOR)):
        await live.transition(who, session_id, "handoff")
    assert [c.session_id for c in await listed(live, AGENT, "waiting_human")] == [ours]
    assert [c.session_id for c in await listed(live, SHOP2_AGENT, "waiting_human")] == [theirs]
    assert [c.session_id for c in await listed(live, SHOP2_AGENT)] == [theirs]


async def test_lists_visitor_gets_only_their_own_newest_first(live: Live) -> None:
    first = await live.open_conversation(ALICE, "first")
    await live.open_conversation(BOB, "bob's")
    second = await live.open_conversation(ALICE, "second")
    gone = await live.open_conversation(ALICE, "done")
    await live.transition(AGENT, gone, "close")
    await live.transition(ALICE, first, "handoff")  # newest event now: first
    own = await listed(live, ALICE)
    assert [c.session_id for c in own] == [first, second]
    assert own[0].state.status == "waiting_human" and own[0].owner == "alice"
    assert [c.session_id for c in await listed(live, ALICE, "closed")] == [gone]
    # `assignee` is for staff; a visitor's list stays their own.
    assert {c.session_id for c in await listed(live, ALICE, assignee="agent-1")} == {first, second}
    assert await listed(live, principal("alice", tenant="shop2")) == []


async def test_lists_refuse_bad_status_and_limit(live: Live) -> None:
    await refused(listed(live, AGENT, "waiting"), grpc.StatusCode.INVALID_ARGUMENT)
    await refused(listed(live, AGENT, limit=-1), grpc.StatusCode.INVALID_ARGUMENT)


async def test_lists_index_moves_an_entry_on_every_change_and_forgets_deleted_sessions(live: Live) -> None:
    session_id = await live.open_conversation(ALICE)
    keys = await index_keys(live)
    assert f"shop1.ai.{session_id}" in keys
    assert sum(k.startswith("shop1.visitor.") and k.endswith(session_id) for k in keys) == 1
    await live.transition(ALICE, session_id, "handoff")
    await live.transition(AGENT, session_id, "claim")
    assert {k for k in await index_keys(live) if k.endswith(session_id) and ".visitor." not in k} == {
        f"shop1.human.{session_id}"}
    await live.stub.DeleteSession(session_pb2.DeleteSessionRequest(principal=ALICE, session_id=session_id))
    assert not {k for k in await index_keys(live) if k.endswith(session_id)}


@pytest.mark.timeout(60)
async def test_lists_index_converges_after_racing_changes(live: Live) -> None:
    session_id = await live.open_conversation(ALICE)
    rng = random.Random(7)
    actions = ["handoff", "claim", "release_ai", "release_queue", "close", "reopen"]
    agents = [principal(f"agent-{i}", "admin") for i in range(4)]
    for _ in range(6):
        await asyncio.gather(*(live.transition(rng.choice(agents), session_id, rng.choice(actions))
                               for _ in range(8)), return_exceptions=True)
    meta = await live.store.read_meta("shop1", session_id)
    assert meta is not None
    keys = {k for k in await index_keys(live) if k.endswith(session_id) and ".visitor." not in k}
    entries = {k for k in keys if ".joined." not in k}
    assert entries == {f"shop1.{meta.state.status}.{session_id}"}
    # The queue marker stands exactly while the conversation waits.
    assert (keys - entries) == ({f"shop1.joined.waiting_human.{session_id}"}
                                if meta.state.status == "waiting_human" else set())
    status = meta.state.status
    summaries = [c for c in await listed(live, AGENT, status) if c.session_id == session_id]
    assert [c.state.version for c in summaries] == [meta.state.version]


async def test_lists_consumer_scan_matches_the_direct_get(live: Live) -> None:
    for visitor in (ALICE, BOB, CAROL):
        await live.transition(visitor, await live.open_conversation(visitor), "handoff")
    subject = f"{INDEX_SUBJECT_PREFIX}.shop1.waiting_human.*"
    direct = await last_per_subject(live.nc, INDEX_STREAM, subject, batch_reads=True)
    consumed = await last_per_subject(live.nc, INDEX_STREAM, subject, batch_reads=False)
    assert len(direct) == 3 and sorted(direct) == sorted(consumed)
