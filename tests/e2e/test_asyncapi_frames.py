"""What the edge really sends over /v1/ws matches docs/asyncapi.yaml: one live-chat exchange through the real
processes (every client frame type, every server frame type), each received frame checked against the
server messages of the document. The tenant has the demo shop's documents, so AI `msg` frames carry citations."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from devtools.devstack.stack import Stack
from devtools.mint_token import mint
from tests.e2e.stack_helpers import SECRET, start_stack, token
from tests.e2e.test_ws_handoff import CLOSED, Peer, connect, is_type, start_conversation, url
from tests.gateway.asyncapi_support import operation_messages, server_frame_problems

TENANT = "shop1"
"""connect()'s default tenant."""
DEMO_SHOP = Path(__file__).resolve().parents[2] / "services" / "llm_worker" / "demo_knowledge" / "demo"
"""The tea shop's documents that `make run` seeds for its demo tenant."""


@pytest.fixture(scope="module")
def frames_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("asyncapi-stack")
    seed_dir = data_dir / "knowledge"
    shutil.copytree(DEMO_SHOP, seed_dir / TENANT)  # seeded before the worker is ready
    stack = start_stack(data_dir, {
        "KEFU_DESK_POLL_S": "0.3", "KEFU_WS_FRAME_RPS": "100", "KEFU_WS_FRAME_BURST": "200",
        "KEFU_KB_SEED_DIR": str(seed_dir)})
    try:
        yield stack
    finally:
        stack.stop()


async def test_every_frame_the_edge_sends_matches_exactly_one_server_message(frames_stack: Stack) -> None:
    peers: list[Peer] = []
    async with aiohttp.ClientSession() as http:
        # Ann authenticates on the upgrade request (a bearer header) and has a display name.
        named = mint(SECRET, tenant="shop1", subject="ann", role="agent", name="Ann")
        ann = Peer(await http.ws_connect(url(frames_stack), headers={"Authorization": f"Bearer {named}"}))
        await ann.send(type="hello")
        welcome = await ann.next(is_type("welcome"))
        bob, _ = await connect(http, frames_stack, sub="bob", role="agent")
        visitor, _ = await connect(http, frames_stack, sub="frames-visitor")
        peers += [ann, bob, visitor]
        assert welcome["conversation_id"] is None and welcome["status"] is None

        await visitor.send(type="ping")
        await visitor.next(is_type("pong"))
        await visitor.send(type="dance")
        await visitor.next(is_type("error", code="unknown_type"))
        # msg echo, ack, ai_delta..., msg from the AI answered from the FAQ document, with its citation
        conversation_id = await start_conversation(visitor, "多久发货？")
        answer = next(f for f in visitor.frames if f["type"] == "msg" and f["sender"]["type"] == "ai")
        assert answer["citations"] and answer["citations"][0]["document_id"], answer
        await visitor.send(type="claim", conversation_id=conversation_id, cid="not-mine")
        await visitor.next(is_type("nack", cid="not-mine", code="forbidden"))

        # Nobody online (both agents away): the handoff stores the offline notice (a system msg).
        for agent in (ann, bob):
            await agent.send(type="presence", status="away")
        await visitor.send(type="handoff", conversation_id=conversation_id, cid="ho", reason="想找人工")
        await visitor.next(is_type("ack", cid="ho"))
        # The ack comes after the state event and the notice; the queue position at any time.
        for expected in (is_type("state", status="waiting_human"), is_type("queue", conversation_id=conversation_id),
                         lambda f: f["type"] == "msg" and f["sender"]["type"] == "system"):
            visitor.rewind()
            await visitor.next(expected)
        await ann.next(lambda f: f["type"] == "queue_update" and bool(f["conversations"]))
        for agent in (ann, bob):
            await agent.send(type="presence", status="online")

        await ann.send(type="claim", conversation_id=conversation_id, cid="k1")
        await ann.next(is_type("ack", cid="k1"))
        await visitor.next(is_type("state", status="human"))
        await visitor.send(type="typing", conversation_id=conversation_id, on=True)
        await ann.next(is_type("typing", conversation_id=conversation_id))
        await ann.send(type="typing", conversation_id=conversation_id, on=False)
        await visitor.next(is_type("typing", on=False))
        await ann.send(type="send", cid="a1", conversation_id=conversation_id, text="您好，我来帮您查。")
        reply = await visitor.next(lambda f: f["type"] == "msg" and f["sender"]["type"] == "agent")
        await visitor.send(type="read", conversation_id=conversation_id, up_to_seq=reply["seq"])
        await ann.next(is_type("read", up_to_seq=reply["seq"]))
        await ann.send(type="note", cid="n1", conversation_id=conversation_id, text="VIP")
        await ann.next(is_type("ack", cid="n1"))
        await ann.send(type="send", cid="nope", text="no conversation named")
        await ann.next(is_type("nack", cid="nope", code="invalid_request"))

        # Release to the queue, claim again, close; the visitor's next message reopens it.
        await ann.send(type="release", conversation_id=conversation_id, to="queue", cid="r1")
        await ann.next(is_type("ack", cid="r1"))
        await ann.send(type="claim", conversation_id=conversation_id, cid="k2")
        await ann.next(is_type("ack", cid="k2"))
        await ann.send(type="close", conversation_id=conversation_id, cid="x1")
        await ann.next(is_type("ack", cid="x1"))
        await visitor.next(is_type("state", status="closed"))
        await visitor.send(type="send", cid="again", conversation_id=conversation_id, text="怎么退货？")
        await visitor.next(is_type("state", status="ai", reason="reopen"))
        await visitor.next(lambda f: f["type"] == "msg" and f["sender"]["type"] == "ai" and "退" in f["text"])

        # A human again, then passed on to bob, whose socket then follows it (its history, notes included).
        await visitor.send(type="send", cid="h2", conversation_id=conversation_id, text="转人工")
        await visitor.next(is_type("state", status="waiting_human", reason="keyword"))
        await ann.send(type="claim", conversation_id=conversation_id, cid="k3")
        await ann.next(is_type("ack", cid="k3"))
        await ann.send(type="transfer", conversation_id=conversation_id, agent="bob", cid="t1")
        await ann.next(is_type("ack", cid="t1"))
        await bob.next(is_type("note", conversation_id=conversation_id))
        await bob.next(is_type("state", status="human", assignee="bob"))

        # The visitor comes back on a second socket: resume, a resent cid, then deletes the conversation.
        last = max(f["seq"] for f in visitor.stored(conversation_id))
        again, resumed = await connect(http, frames_stack, sub="frames-visitor",
                                       resume=[{"conversation_id": conversation_id, "after_seq": last - 1}])
        peers.append(again)
        assert resumed["resume"] == [{"conversation_id": conversation_id, "result": "ok"}]
        await again.send(type="send", cid="h2", conversation_id=conversation_id, text="转人工")
        await again.next(is_type("ack", cid="h2", duplicate=True))
        deleted = await http.delete(f"{frames_stack.base_url}/v1/sessions/{conversation_id}",
                                    headers={"Authorization": f"Bearer {token(sub='frames-visitor')}"})
        assert deleted.status == 204
        await bob.next(is_type("resync", conversation_id=conversation_id))
        for tab in (visitor, again):
            await tab.next(is_type("error", code="not_found"))
            assert (await tab.ws.receive(timeout=10)).type in CLOSED and tab.ws.close_code == 4003
        for peer in (ann, bob):
            await peer.drain(0.3)
            await peer.ws.close()

    problems = [problem for peer in peers for frame in peer.frames for problem in server_frame_problems(frame)]
    assert not problems, "\n".join(problems[:20])
    seen = {frame["type"] for peer in peers for frame in peer.frames}
    documented = {message["name"] for message in operation_messages("send").values()}
    assert seen == documented, f"documented, not seen: {documented - seen}; seen, not documented: {seen - documented}"
