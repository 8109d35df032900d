"""GET /v1/conversations and /v1/conversations/{id}/events over the real session service and nats-server."""

from __future__ import annotations

from kefu.session.v1 import session_pb2, session_pb2_grpc
from tests.gateway.live_http_support import EdgeClient, bearer, expect_error
from tests.gateway.session_edge import AGENT, say, who


async def listed(client: EdgeClient, headers: dict[str, str], **params: str) -> list[dict[str, object]]:
    response = await client.get("/v1/conversations", params=params, headers=headers)
    assert response.status == 200, await response.text()
    conversations: list[dict[str, object]] = (await response.json())["conversations"]
    return conversations


async def test_conversations_list_by_status_and_assignee(client: EdgeClient,
                                                         stub: session_pb2_grpc.SessionServiceStub) -> None:
    chatting = await say(stub, who("v_alice"), "Where is my order?")
    waiting = await say(stub, who("v_bob"), "I want a human, please")
    await stub.Transition(session_pb2.TransitionRequest(principal=who("v_bob"), session_id=waiting,
                                                        action="handoff"))
    await say(stub, who("v_carol", tenant="shop2"), "another shop")

    everything = await listed(client, bearer())
    assert {c["conversation_id"] for c in everything} == {chatting, waiting}
    queue = await listed(client, bearer(), status="waiting_human")
    assert [c["conversation_id"] for c in queue] == [waiting]
    assert queue[0]["visitor_id"] == "v_bob" and queue[0]["waiting_since"] == queue[0]["since"]
    assert queue[0]["preview"] == "I want a human, please" and "assignee" not in queue[0]

    await stub.Transition(session_pb2.TransitionRequest(principal=AGENT, session_id=waiting, action="claim",
                                                        assignee_name="Agent One"))
    mine = await listed(client, bearer(), status="human", assignee="agent-1")
    assert [(c["conversation_id"], c["assignee"], c["assignee_name"]) for c in mine] == [
        (waiting, "agent-1", "Agent One")]
    assert "waiting_since" not in mine[0] and int(str(mine[0]["version"])) >= 2
    assert await listed(client, bearer(), status="human", assignee="agent-2") == []
    assert await listed(client, bearer(), status="closed") == []
    assert len(await listed(client, bearer(role="admin"), limit="1")) == 1
    # Another tenant's staff sees only its own.
    assert [c["visitor_id"] for c in await listed(client, bearer(tenant="shop2"))] == ["v_carol"]


async def test_conversations_list_refusals(client: EdgeClient) -> None:
    await expect_error(await client.get("/v1/conversations", headers=bearer(role="visitor", sub="v_alice")),
                       403, "forbidden")
    await expect_error(await client.get("/v1/conversations"), 401, "unauthorized")
    for params in ({"status": "open"}, {"limit": "0"}, {"limit": "1001"}, {"limit": "ten"}, {"limit": "-1"},
                   {"assignee": "a" * 257}):
        await expect_error(await client.get("/v1/conversations", params=params, headers=bearer()),
                           422, "invalid_request")


async def test_conversation_events_pages_with_notes_for_staff_only(client: EdgeClient,
                                                                   stub: session_pb2_grpc.SessionServiceStub) -> None:
    conversation = await say(stub, who("v_alice"), "Hello?")
    await stub.Append(session_pb2.AppendRequest(principal=who("v_alice"), session_id=conversation, role="assistant",
                                                content="Hi! How can I help?"))
    await stub.Transition(session_pb2.TransitionRequest(principal=AGENT, session_id=conversation, action="claim",
                                                        assignee_name="Agent One"))
    await stub.Append(session_pb2.AppendRequest(principal=AGENT, session_id=conversation, role="agent", kind="note",
                                                content="VIP customer", sender_name="Agent One"))
    await stub.Append(session_pb2.AppendRequest(principal=AGENT, session_id=conversation, role="agent",
                                                content="I am here to help.", sender_name="Agent One"))
    url = f"/v1/conversations/{conversation}/events"

    staff = await (await client.get(url, headers=bearer())).json()
    events = staff["events"]
    assert staff["conversation_id"] == conversation and staff["has_more"] is False
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and staff["next_after_seq"] == seqs[-1]
    said = [(e["type"], e["sender"]["type"], e["text"]) for e in events if e["type"] != "state"]
    assert said == [("msg", "visitor", "Hello?"), ("msg", "ai", "Hi! How can I help?"),
                    ("note", "agent", "VIP customer"), ("msg", "agent", "I am here to help.")]
    claim = [e for e in events if e["type"] == "state" and e["status"] == "human"]
    assert claim and claim[0]["assignee"] == "agent-1" and claim[0]["assignee_name"] == "Agent One"
    assert events[0]["conversation_id"] == conversation and isinstance(events[0]["ts"], float)

    # The owner gets the same log without the note.
    owner = await (await client.get(url, headers=bearer(role="visitor", sub="v_alice"))).json()
    assert owner["events"] == [e for e in events if e["type"] != "note"]

    # Pages of two, oldest first, until has_more is false.
    pages, after = [], 0
    while True:
        page = await (await client.get(url, params={"after_seq": str(after), "limit": "2"}, headers=bearer())).json()
        pages.append([e["seq"] for e in page["events"]])
        after = page["next_after_seq"]
        if not page["has_more"]:
            break
    assert [seq for page in pages for seq in page] == seqs and all(len(p) <= 2 for p in pages)
    tail = await (await client.get(url, params={"after_seq": str(seqs[-1])}, headers=bearer())).json()
    assert tail["events"] == [] and tail["next_after_seq"] == seqs[-1] and tail["has_more"] is False


async def test_conversation_events_are_not_found_for_anyone_else(client: EdgeClient,
                                                                 stub: session_pb2_grpc.SessionServiceStub) -> None:
    conversation = await say(stub, who("v_alice"), "private")
    url = f"/v1/conversations/{conversation}/events"
    never = await client.get("/v1/conversations/" + "0" * 32 + "/events", headers=bearer())
    error = await expect_error(never, 404, "not_found")
    for headers in (bearer(role="visitor", sub="v_mallory"), bearer(tenant="shop2"),
                    bearer(role="visitor", sub="v_alice", tenant="shop2")):
        other = await expect_error(await client.get(url, headers=headers), 404, "not_found")
        assert other["message"] == error["message"]
    await expect_error(await client.get("/v1/conversations/x/events", headers=bearer()), 404, "not_found")
    await expect_error(await client.get("/v1/conversations/" + "a" * 129 + "/events", headers=bearer()),
                       404, "not_found")
    for params in ({"after_seq": "-1"}, {"after_seq": "1.5"}, {"after_seq": "9" * 20}, {"limit": "0"}):
        await expect_error(await client.get(url, params=params, headers=bearer()), 422, "invalid_request")


async def test_session_messages_list_only_what_was_said(client: EdgeClient,
                                                        stub: session_pb2_grpc.SessionServiceStub) -> None:
    conversation = await say(stub, who("v_alice"), "Hello?")
    await stub.Transition(session_pb2.TransitionRequest(principal=who("v_alice"), session_id=conversation,
                                                        action="handoff"))
    await stub.Transition(session_pb2.TransitionRequest(principal=AGENT, session_id=conversation, action="claim"))
    await stub.Append(session_pb2.AppendRequest(principal=AGENT, session_id=conversation, role="agent", kind="note",
                                                content="note to self"))
    await stub.Append(session_pb2.AppendRequest(principal=AGENT, session_id=conversation, role="agent",
                                                content="Hello, I am Ann."))
    for headers in (bearer(role="visitor", sub="v_alice"), bearer()):
        body = await (await client.get(f"/v1/sessions/{conversation}/messages", headers=headers)).json()
        assert [(m["role"], m["content"]) for m in body["messages"]] == [("user", "Hello?"),
                                                                         ("agent", "Hello, I am Ann.")]
