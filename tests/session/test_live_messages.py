"""Live-chat appends over gRPC: notes stay with staff, conditional AI replies, void replies, reopening."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from kefu.session.v1 import session_pb2
from services.session.models import StoredMessage, new_id
from tests.session.live_helpers import Live, principal, refused

ALICE = principal("alice")
AGENT = principal("agent-1", "agent")
StatusCode = grpc.StatusCode


async def note(live: Live, session_id: str, text: str) -> session_pb2.AppendResponse:
    response: session_pb2.AppendResponse = await live.stub.Append(session_pb2.AppendRequest(
        principal=AGENT, session_id=session_id, role="agent", kind="note", content=text, sender_name="Agent One"))
    return response


async def ai_reply(live: Live, session_id: str, text: str, version: int) -> session_pb2.AppendResponse:
    response: session_pb2.AppendResponse = await live.stub.Append(session_pb2.AppendRequest(
        principal=ALICE, session_id=session_id, role="assistant", content=text, if_version=version))
    return response


async def test_live_note_is_stored_with_its_sender_and_never_reaches_the_visitor(live: Live) -> None:
    session_id = await live.open_conversation(ALICE, "where is my parcel?")
    written = await note(live, session_id, "VIP customer, be quick")
    assert (written.message.kind, written.message.sender_id, written.message.sender_name) == (
        "note", "agent-1", "Agent One")
    await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=session_id, role="user",
                                                     content="still there?"))
    assert [m.content for m in await live.messages(ALICE, session_id)] == ["where is my parcel?", "still there?"]
    assert "VIP customer, be quick" in [m.content for m in await live.messages(AGENT, session_id)]
    await note(live, session_id, "second note")
    await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=session_id, role="user",
                                                     content="hello?"))
    assert [m.content for m in await live.messages(ALICE, session_id)] == [
        "where is my parcel?", "still there?", "hello?"]
    assert [m.kind for m in await live.messages(AGENT, session_id)] == [
        "message", "note", "message", "note", "message"]
    built = await live.stub.BuildContext(session_pb2.BuildContextRequest(principal=AGENT, session_id=session_id))
    assert [m.content for m in built.messages] == ["where is my parcel?", "still there?", "hello?"]


async def test_live_only_agents_write_notes(live: Live) -> None:
    session_id = await live.open_conversation(ALICE)
    await refused(live.stub.Append(session_pb2.AppendRequest(
        principal=ALICE, session_id=session_id, role="user", kind="note", content="x")), StatusCode.PERMISSION_DENIED)
    await refused(live.stub.Append(session_pb2.AppendRequest(
        principal=AGENT, session_id=session_id, role="system", kind="note", content="x")), StatusCode.INVALID_ARGUMENT)
    await refused(live.stub.Append(session_pb2.AppendRequest(
        principal=AGENT, session_id=session_id, role="agent", kind="state", content="x")), StatusCode.INVALID_ARGUMENT)


async def test_live_conditional_reply_under_an_old_version_is_refused_and_not_stored(live: Live) -> None:
    session_id = await live.open_conversation(ALICE)
    stored = await ai_reply(live, session_id, "an answer", 1)
    assert stored.message.version == 1 and stored.state.version == 1
    await live.transition(AGENT, session_id, "claim")
    await refused(ai_reply(live, session_id, "too late", 1), StatusCode.ABORTED)
    assert "too late" not in [m.content for m in await live.messages(AGENT, session_id)]


async def test_live_void_ai_reply_after_a_claim_reaches_no_reader(live: Live) -> None:
    session_id = await live.open_conversation(ALICE, "question")
    await live.transition(AGENT, session_id, "claim")
    # An AI reply generated under version 1 that landed after the claim's state event anyway
    # (as if the check after publishing had not run yet): written straight into the log.
    void = StoredMessage(id=new_id(), role="assistant", content="void answer", created_at=time.time(), tokens=2,
                         version=1)
    await live.nc.jetstream().publish(f"kefu.msg.shop1.{session_id}", void.to_json())
    await live.stub.Append(session_pb2.AppendRequest(principal=AGENT, session_id=session_id, role="agent",
                                                     content="a human here"))
    for who in (ALICE, AGENT):
        contents = [m.content for m in await live.messages(who, session_id)]
        assert "void answer" not in contents and "a human here" in contents
    built = await live.stub.BuildContext(session_pb2.BuildContextRequest(principal=ALICE, session_id=session_id))
    assert [m.content for m in built.messages] == ["question", "a human here"]


async def test_live_reply_racing_a_claim_is_taken_back(live: Live) -> None:
    # Whatever the interleaving, a reply conditional on version 1 is stored and kept only if it
    # committed before the claim; it is never kept after the claim's event.
    for _ in range(5):
        session_id = await live.open_conversation(ALICE)
        reply, claim = await asyncio.gather(ai_reply(live, session_id, "racing answer", 1),
                                            live.transition(AGENT, session_id, "claim"), return_exceptions=True)
        assert isinstance(claim, session_pb2.TransitionResponse)
        messages = await live.messages(AGENT, session_id)
        kept = [m for m in messages if m.content == "racing answer"]
        if isinstance(reply, grpc.aio.AioRpcError):
            assert reply.code() is StatusCode.ABORTED and not kept
        else:
            assert len(kept) == 1 and kept[0].seq < claim.event.seq


async def test_live_visitor_message_reopens_a_closed_conversation(live: Live) -> None:
    session_id = await live.open_conversation(ALICE)
    await live.transition(AGENT, session_id, "close")
    agent_note = await note(live, session_id, "closed, but noted")
    assert agent_note.state.status == "closed"
    response = await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=session_id,
                                                                role="user", content="one more thing"))
    assert (response.state.status, response.state.reason, response.state.version) == ("ai", "reopen", 3)
    tail = (await live.messages(ALICE, session_id))[-2:]
    assert [(m.kind, m.content) for m in tail] == [("state", "status: ai (reopen)"), ("message", "one more thing")]


@pytest.mark.parametrize("role", ["agent", "user"])
async def test_live_sender_id_is_the_principals_subject(live: Live, role: str) -> None:
    session_id = await live.open_conversation(ALICE)
    who = AGENT if role == "agent" else ALICE
    response = await live.stub.Append(session_pb2.AppendRequest(principal=who, session_id=session_id, role=role,
                                                                content="hi", sender_name="Name"))
    assert (response.message.sender_id, response.message.sender_name) == (who.subject, "Name")
    ai = await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=session_id,
                                                          role="assistant", content="hello"))
    assert ai.message.sender_id == ""


async def test_live_conditional_first_message_needs_version_1(live: Live) -> None:
    await refused(live.stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="x",
                                                             if_version=2)), StatusCode.ABORTED)
    created = await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="x",
                                                                if_version=1))
    assert created.created and created.message.version == 1
    assert [c.session_id for c in (await live.stub.ListConversations(session_pb2.ListConversationsRequest(
        principal=ALICE))).conversations] == [created.session_id]


async def test_live_concurrent_visitor_messages_reopen_once(live: Live) -> None:
    session_id = await live.open_conversation(ALICE)
    await live.transition(AGENT, session_id, "close")
    responses = await asyncio.gather(*(live.stub.Append(session_pb2.AppendRequest(
        principal=ALICE, session_id=session_id, role="user", content=f"m{i}")) for i in range(5)))
    assert {r.state.status for r in responses} == {"ai"}
    reopens = [m for m in await live.messages(ALICE, session_id) if m.kind == "state" and m.state.reason == "reopen"]
    assert len(reopens) == 1
