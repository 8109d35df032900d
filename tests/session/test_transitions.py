"""Transition over real gRPC and a real nats-server: every rule, its refusals and their status codes."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from kefu.session.v1 import session_pb2
from services.session.store import META_BUCKET
from tests.session.live_helpers import Live, principal, refused

ALICE = principal("alice")
BOB = principal("bob")
AGENT = principal("agent-1", "agent")
AGENT_2 = principal("agent-2", "agent")
ADMIN = principal("boss", "admin")
OTHER_TENANT_AGENT = principal("agent-1", "agent", tenant="shop2")
StatusCode = grpc.StatusCode


async def queued(live: Live) -> str:
    session_id = await live.open_conversation(ALICE)
    await live.transition(ALICE, session_id, "handoff")
    return session_id


async def held(live: Live, agent: session_pb2.Principal = AGENT) -> str:
    session_id = await queued(live)
    await live.transition(agent, session_id, "claim", assignee_name="Agent One")
    return session_id


async def test_transition_new_conversation_starts_in_ai_at_version_1(live: Live) -> None:
    response = await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="hi"))
    assert (response.state.status, response.state.version, response.state.reason) == ("ai", 1, "created")
    assert response.message.sender_id == "alice" and response.message.kind == "message"


async def test_transition_visitor_handoff_queues_and_stores_a_state_event(live: Live) -> None:
    session_id = await live.open_conversation(ALICE)
    response = await live.transition(ALICE, session_id, "handoff")
    assert (response.state.status, response.state.version, response.state.reason) == ("waiting_human", 2, "visitor")
    assert not response.unchanged
    event = response.event
    assert (event.kind, event.role, event.tokens, event.content) == ("state", "system", 0,
                                                                     "status: waiting_human (visitor)")
    assert event.state == response.state
    messages = await live.messages(ALICE, session_id)
    assert [(m.kind, m.seq) for m in messages] == [("message", messages[0].seq), ("state", event.seq)]
    assert live.metrics.registry.get_sample_value("kefu_handoffs_total", {"trigger": "visitor"}) == 1
    # Asked twice (a double click): nothing changes, nothing is stored, nothing counted.
    again = await live.transition(ALICE, session_id, "handoff")
    assert again.unchanged and not again.HasField("event") and again.state.version == 2
    assert len(await live.messages(ALICE, session_id)) == 2
    assert live.metrics.registry.get_sample_value("kefu_handoffs_total", {"trigger": "visitor"}) == 1


async def test_transition_handoff_reason_from_the_edge_is_the_trigger(live: Live) -> None:
    session_id = await live.open_conversation(ALICE)
    response = await live.transition(ALICE, session_id, "handoff", reason="keyword")
    assert response.state.reason == "keyword"
    assert live.metrics.registry.get_sample_value("kefu_handoffs_total", {"trigger": "keyword"}) == 1
    other = await live.open_conversation(ALICE)
    await refused(live.transition(ALICE, other, "handoff", reason="I want a human now"), StatusCode.INVALID_ARGUMENT)


async def test_transition_claim_assigns_the_caller_and_observes_the_queue_wait(live: Live) -> None:
    session_id = await queued(live)
    await refused(live.transition(ALICE, session_id, "claim"), StatusCode.PERMISSION_DENIED)
    response = await live.transition(AGENT, session_id, "claim", assignee_name="Agent One", assignee="someone-else")
    state = response.state
    assert (state.status, state.assignee, state.assignee_name, state.reason, state.version) == (
        "human", "agent-1", "Agent One", "claim", 3)
    assert live.metrics.registry.get_sample_value("kefu_queue_wait_seconds_count") == 1
    again = await live.transition(AGENT, session_id, "claim")
    assert again.unchanged and again.state.version == 3
    assert "claim_conflict" in await refused(live.transition(AGENT_2, session_id, "claim"), StatusCode.ABORTED)


async def test_transition_claim_straight_from_ai_is_not_a_queue_wait(live: Live) -> None:
    session_id = await live.open_conversation(ALICE)
    response = await live.transition(AGENT, session_id, "claim")
    assert response.state.status == "human"
    assert not live.metrics.registry.get_sample_value("kefu_queue_wait_seconds_count")


@pytest.mark.timeout(60)
async def test_transition_ten_agents_racing_to_claim_have_exactly_one_winner(live: Live) -> None:
    session_id = await queued(live)
    agents = [principal(f"agent-{i}", "agent") for i in range(10)]
    results = await asyncio.gather(*(live.transition(a, session_id, "claim") for a in agents), return_exceptions=True)
    winners = [r for r in results if isinstance(r, session_pb2.TransitionResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 9
    assert all(e.code() is StatusCode.ABORTED and "claim_conflict" in (e.details() or "") for e in losers)
    claims = [m for m in await live.messages(AGENT, session_id) if m.kind == "state" and m.state.reason == "claim"]
    assert len(claims) == 1 and claims[0].state.assignee == winners[0].state.assignee


async def test_transition_stale_expected_version_is_aborted(live: Live) -> None:
    session_id = await queued(live)  # version 2
    await refused(live.transition(AGENT, session_id, "close", expected_version=1), StatusCode.ABORTED)
    assert "claim_conflict" in await refused(live.transition(AGENT, session_id, "claim", expected_version=1),
                                             StatusCode.ABORTED)
    response = await live.transition(AGENT, session_id, "claim", expected_version=2)
    assert response.state.version == 3


@pytest.mark.parametrize(("setup", "who", "action"), [
    ("ai", AGENT, "release_queue"), ("ai", AGENT, "release_ai"), ("ai", AGENT, "transfer"), ("ai", AGENT, "reopen"),
    ("waiting", AGENT, "reopen"), ("waiting", AGENT, "release_queue"), ("human", ALICE, "handoff"),
    ("closed", AGENT, "close"), ("closed", AGENT, "claim"), ("closed", ALICE, "handoff"),
])
async def test_transition_from_the_wrong_status_is_a_failed_precondition(live: Live, setup: str,
                                                                         who: session_pb2.Principal,
                                                                         action: str) -> None:
    session_id = await live.open_conversation(ALICE)
    if setup == "waiting":
        await live.transition(ALICE, session_id, "handoff")
    elif setup == "human":
        await live.transition(AGENT, session_id, "claim")
    elif setup == "closed":
        await live.transition(AGENT, session_id, "close")
    await refused(live.transition(who, session_id, action, assignee="agent-2"), StatusCode.FAILED_PRECONDITION)


@pytest.mark.parametrize("action", ["claim", "release_ai", "release_queue", "transfer", "close", "reopen"])
async def test_transition_visitors_may_only_hand_off(live: Live, action: str) -> None:
    session_id = await live.open_conversation(ALICE)
    await refused(live.transition(ALICE, session_id, action, assignee="agent-2"), StatusCode.PERMISSION_DENIED)


async def test_transition_releases_belong_to_the_assignee_or_an_admin(live: Live) -> None:
    session_id = await held(live)
    await refused(live.transition(AGENT_2, session_id, "release_ai"), StatusCode.PERMISSION_DENIED)
    await refused(live.transition(AGENT_2, session_id, "release_queue"), StatusCode.PERMISSION_DENIED)
    back = await live.transition(AGENT, session_id, "release_queue")
    assert (back.state.status, back.state.assignee, back.state.reason) == ("waiting_human", "", "release")
    # Anyone of the staff may send a waiting conversation back to the AI.
    to_ai = await live.transition(AGENT_2, session_id, "release_ai")
    assert (to_ai.state.status, to_ai.state.reason) == ("ai", "release")
    other = await held(live)
    assert (await live.transition(ADMIN, other, "release_ai")).state.status == "ai"


async def test_transition_transfer_passes_a_held_conversation_on(live: Live) -> None:
    session_id = await held(live)
    await refused(live.transition(AGENT, session_id, "transfer"), StatusCode.INVALID_ARGUMENT)
    await refused(live.transition(AGENT_2, session_id, "transfer", assignee="agent-2"), StatusCode.PERMISSION_DENIED)
    moved = await live.transition(AGENT, session_id, "transfer", assignee="agent-2", assignee_name="Agent Two")
    assert (moved.state.status, moved.state.assignee, moved.state.assignee_name, moved.state.reason) == (
        "human", "agent-2", "Agent Two", "transfer")
    by_admin = await live.transition(ADMIN, session_id, "transfer", assignee="agent-3")
    assert by_admin.state.assignee == "agent-3"
    same = await live.transition(ADMIN, session_id, "transfer", assignee="agent-3")
    assert same.unchanged


async def test_transition_close_and_reopen(live: Live) -> None:
    session_id = await held(live)
    closed = await live.transition(AGENT_2, session_id, "close")
    assert (closed.state.status, closed.state.assignee, closed.state.reason) == ("closed", "", "close")
    reopened = await live.transition(AGENT, session_id, "reopen")
    assert (reopened.state.status, reopened.state.reason, reopened.state.version) == ("ai", "reopen", 5)


@pytest.mark.parametrize("action", ["", "escalate", "idle", "wait_timeout", "reopen_by_visitor"])
async def test_transition_unknown_actions_are_invalid(live: Live, action: str) -> None:
    session_id = await live.open_conversation(ALICE)
    await refused(live.transition(AGENT, session_id, action), StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize("who", [BOB, OTHER_TENANT_AGENT])
async def test_transition_of_someone_elses_conversation_is_not_found(live: Live, who: session_pb2.Principal) -> None:
    session_id = await live.open_conversation(ALICE)
    for target in (session_id, "0" * 32, "not-an-id"):
        await refused(live.transition(who, target, "handoff"), StatusCode.NOT_FOUND)
    assert (await live.transition(ALICE, session_id, "handoff")).state.version == 2  # untouched until now


async def test_transition_a_session_stored_before_the_live_chat_reads_as_ai_version_1(live: Live) -> None:
    # A metadata record as the store wrote it before conversation state existed.
    kv = await live.nc.jetstream().key_value(META_BUCKET)
    session_id = "ab" * 16
    now = time.time()
    await kv.put(f"shop1.{session_id}", json.dumps({
        "tenant": "shop1", "owner": "alice", "created_at": now, "updated_at": now, "message_count": 0,
        "user_message_count": 0, "token_count": 0}).encode())
    response = await live.transition(ALICE, session_id, "handoff")
    assert (response.state.status, response.state.version) == ("waiting_human", 2)
