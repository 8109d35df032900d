"""Live chat with agents through the real processes: handoff, claim race, replies, notes, release, close,
isolation between tenants, frame floods, and resume across edge processes while an agent keeps sending."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.js.errors
import pytest

from bench.sse_reader import read_sse
from devtools.devstack.stack import Stack, free_port
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from tests.e2e.stack_helpers import faq_plugins_env, start_stack, token

Frame = dict[str, Any]
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The knowledge-base stack with a second edge process on its own port ("edge-b")."""
    data_dir = tmp_path_factory.mktemp("live-stack")
    stack = start_stack(data_dir, {
        "KEFU_RATE_LIMIT_RPS": "1000", "KEFU_DESK_POLL_S": "0.5", "KEFU_WS_FRAME_RPS": "50",
        "KEFU_WS_FRAME_BURST": "100", **faq_plugins_env(data_dir)})
    try:
        stack.start_edge("edge-b", free_port())
        yield stack
    finally:
        stack.stop()


def url(stack: Stack, edge: str | None = None) -> str:
    port = stack.edges[edge] if edge else None
    return f"ws://127.0.0.1:{port}/v1/ws" if port else f"{stack.base_url.replace('http', 'ws', 1)}/v1/ws"


class Peer:
    """One socket and every frame it received, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self._read = 0

    async def next(self, predicate: Callable[[Frame], bool], timeout_s: float = 20.0) -> Frame:
        """The next frame (after those already returned) that matches; frames skipped stay in `frames`."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    while self._read < len(self.frames):
                        frame = self.frames[self._read]
                        self._read += 1
                        if predicate(frame):
                            return frame
                    message = await self.ws.receive()
                    if message.type in CLOSED:
                        raise AssertionError(f"closed {self.ws.close_code} while waiting; got {self.frames[-5:]}")
                    self.frames.append(json.loads(message.data))
        except TimeoutError:
            raise AssertionError(f"no such frame within {timeout_s} s; the last ones: {self.frames[-6:]}") from None

    def rewind(self) -> None:
        """Let `next` look at every frame received so far again."""
        self._read = 0

    async def drain(self, quiet_s: float = 0.5) -> None:
        """Read until nothing arrives for `quiet_s`."""
        while True:
            try:
                message = await self.ws.receive(timeout=quiet_s)
            except TimeoutError:
                return
            if message.type in CLOSED:
                return
            self.frames.append(json.loads(message.data))

    async def send(self, **frame: Any) -> None:
        await self.ws.send_json(frame)

    def stored(self, conversation_id: str) -> list[Frame]:
        return [f for f in self.frames if f.get("conversation_id") == conversation_id and "seq" in f]


async def connect(http: aiohttp.ClientSession, stack: Stack, *, sub: str, role: str = "visitor",
                  tenant: str = "shop1", edge: str | None = None, resume: list[Frame] | None = None,
                  name: str = "") -> tuple[Peer, Frame]:
    ws = await http.ws_connect(url(stack, edge))
    peer = Peer(ws)
    hello: Frame = {"type": "hello", "token": token(tenant=tenant, sub=sub, role=role)}
    if resume is not None:
        hello["resume"] = resume
    await peer.send(**hello)
    welcome = await peer.next(lambda f: f["type"] == "welcome")
    return peer, welcome


def is_type(kind: str, **fields: object) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == kind and all(f.get(k) == v for k, v in fields.items())


def answers(cid: str) -> Callable[[Frame], bool]:
    """The ack or nack of the frame sent with `cid`."""
    return lambda f: f["type"] in ("ack", "nack") and f.get("cid") == cid


def has_cid(cid: object) -> Callable[[Frame], bool]:
    return lambda f: f.get("cid") == cid


async def start_conversation(peer: Peer, text: str = "你们卖什么茶？") -> str:
    await peer.send(type="send", cid="first", text=text)
    ack = await peer.next(is_type("ack", cid="first"))
    conversation_id = next(f["conversation_id"] for f in peer.frames if f.get("message_id") and f["seq"] == ack["seq"])
    await peer.next(lambda f: f["type"] == "msg" and f["sender"]["type"] == "ai")
    return str(conversation_id)


async def test_handoff_claim_reply_note_release_through_two_edges(live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        agent, agent_welcome = await connect(http, live_stack, sub="ann", role="agent", edge="edge-b")
        assert agent_welcome["role"] == "agent" and agent_welcome["conversation_id"] is None
        visitor, welcome = await connect(http, live_stack, sub="hv-1")
        assert welcome["greeting"]
        conversation_id = await start_conversation(visitor)
        # Words that ask for a human: stored, no AI answer, the conversation waits for an agent.
        await visitor.send(type="send", cid="h", conversation_id=conversation_id, text="转人工")
        await visitor.next(is_type("ack", cid="h"))
        waiting = await visitor.next(is_type("state", status="waiting_human"))
        assert waiting["reason"] == "keyword" and waiting["conversation_id"] == conversation_id
        queued = await agent.next(lambda f: f["type"] == "queue_update" and any(
            c["conversation_id"] == conversation_id for c in f["conversations"]))
        entry = next(c for c in queued["conversations"] if c["conversation_id"] == conversation_id)
        assert entry["waiting_since"] > 0
        position = await visitor.next(is_type("queue", conversation_id=conversation_id))
        assert position["position"] >= 1
        # The agent (on the other edge) claims: the visitor sees who took it; the agent gets the history.
        await agent.send(type="claim", conversation_id=conversation_id, cid="c1")
        claimed = await agent.next(is_type("ack", cid="c1"))
        human = await visitor.next(is_type("state", status="human"))
        assert human["assignee"] == "ann" and human["version"] > waiting["version"]
        assert claimed["seq"] == human["seq"]
        # The claim subscribes the agent: the conversation's history reaches it, before or after the ack.
        agent.rewind()
        history = await agent.next(lambda f: f["type"] == "state" and f["status"] == "human")
        assert [f["seq"] for f in agent.stored(conversation_id) if f["seq"] <= history["seq"]] == \
            [f["seq"] for f in visitor.stored(conversation_id) if f["seq"] <= history["seq"]]
        # While a human holds it, a visitor message reaches the agent and the AI stays silent.
        await visitor.send(type="send", cid="q2", conversation_id=conversation_id, text="我的订单到哪了？")
        asked = await agent.next(lambda f: f["type"] == "msg" and f["text"] == "我的订单到哪了？")
        assert asked["sender"] == {"type": "visitor", "id": "hv-1"}
        await agent.send(type="send", cid="r1", conversation_id=conversation_id, text="您好，我帮您查一下。")
        await agent.next(is_type("ack", cid="r1"))
        reply = await visitor.next(lambda f: f["type"] == "msg" and f["sender"]["type"] == "agent")
        assert reply["text"] == "您好，我帮您查一下。" and reply["sender"]["id"] == "ann"
        # Typing goes across edges, not back to its sender.
        await visitor.send(type="typing", conversation_id=conversation_id, on=True)
        typing = await agent.next(is_type("typing", conversation_id=conversation_id))
        assert typing["sender"] == {"type": "visitor", "id": "hv-1"} and typing["on"] is True
        # A private note: acknowledged to the agent, never sent to the visitor.
        await agent.send(type="note", conversation_id=conversation_id, cid="n1", text="VIP customer")
        note = await agent.next(is_type("note", conversation_id=conversation_id))
        assert note["text"] == "VIP customer" and note["cid"] == "n1"
        assert (await agent.next(is_type("ack", cid="n1")))["seq"] == note["seq"]  # the echo, then the ack
        # Release to the AI: the visitor is answered by the AI again.
        await agent.send(type="release", conversation_id=conversation_id, to="ai", cid="rel")
        await agent.next(is_type("ack", cid="rel"))
        await visitor.next(is_type("state", status="ai"))
        await visitor.send(type="send", cid="q3", conversation_id=conversation_id, text="怎么退货？")
        answer = await visitor.next(lambda f: f["type"] == "msg" and f["sender"]["type"] == "ai"
                                    and f["seq"] > reply["seq"])
        assert "退" in answer["text"]
        await visitor.drain()
        assert not [f for f in visitor.frames if f["type"] == "note" or f.get("text") == "VIP customer"]
        # No AI answer was given while the human held the conversation.
        ai_seqs = [f["seq"] for f in visitor.stored(conversation_id) if f["type"] == "msg"
                   and f["sender"]["type"] == "ai"]
        assert not [s for s in ai_seqs if human["seq"] < s < reply["seq"]]
        # The history API shows the same conversation to its owner, without notes or state events.
        async with http.get(f"{live_stack.base_url}/v1/sessions/{conversation_id}/messages",
                            headers={"Authorization": f"Bearer {token(sub='hv-1')}"}) as response:
            listed = (await response.json())["messages"]
        assert "VIP customer" not in [m["content"] for m in listed]
        assert [m["role"] for m in listed].count("agent") == 1
        await visitor.ws.close()
        await agent.ws.close()


async def test_claim_race_of_ten_agents_has_one_winner(live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, live_stack, sub="race-visitor")
        conversation_id = await start_conversation(visitor)
        await visitor.send(type="handoff", conversation_id=conversation_id, cid="ho")
        await visitor.next(is_type("ack", cid="ho"))
        agents = [(await connect(http, live_stack, sub=f"racer-{n}", role="agent",
                                 edge="edge-b" if n % 2 else None))[0] for n in range(10)]
        await asyncio.gather(*(a.send(type="claim", conversation_id=conversation_id, cid=f"k{n}")
                               for n, a in enumerate(agents)))
        replies = await asyncio.gather(*(a.next(answers(f"k{n}")) for n, a in enumerate(agents)))
        winners = [n for n, frame in enumerate(replies) if frame["type"] == "ack"]
        assert len(winners) == 1, replies
        assert {f["code"] for f in replies if f["type"] == "nack"} == {"claim_conflict"}
        assert all(f["request_type"] == "claim" for f in replies if f["type"] == "nack")
        human = await visitor.next(is_type("state", status="human"))
        assert human["assignee"] == f"racer-{winners[0]}"
        for peer in [visitor, *agents]:
            await peer.ws.close()


async def test_agents_cannot_touch_another_tenants_conversation(live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, live_stack, sub="iso-visitor")
        conversation_id = await start_conversation(visitor)
        intruder, _ = await connect(http, live_stack, sub="mallory", role="agent", tenant="shop2")
        for frame in ({"type": "claim", "cid": "x1"}, {"type": "note", "cid": "x2", "text": "hi"},
                      {"type": "send", "cid": "x3", "text": "hi"}, {"type": "close", "cid": "x4"}):
            await intruder.send(conversation_id=conversation_id, **frame)
            nack = await intruder.next(has_cid(frame["cid"]))
            assert (nack["type"], nack["code"]) == ("nack", "forbidden"), nack
        await intruder.ws.close()
        # Resuming it closes the socket with 4003, like a visitor resuming someone else's.
        ws = await http.ws_connect(url(live_stack))
        await ws.send_json({"type": "hello", "token": token(tenant="shop2", sub="mallory", role="agent"),
                            "resume": [{"conversation_id": conversation_id, "after_seq": 0}]})
        while (message := await ws.receive(timeout=10)).type not in CLOSED:
            assert json.loads(message.data)["type"] != "msg"
        assert ws.close_code == 4003
        # And a visitor cannot claim, even its own conversation.
        await visitor.send(type="claim", conversation_id=conversation_id, cid="self")
        nack = await visitor.next(lambda f: f.get("cid") == "self")
        assert (nack["type"], nack["code"]) == ("nack", "forbidden")
        await visitor.ws.close()


async def test_a_frame_flood_closes_4008_and_the_edge_serves_on(live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        flooder, _ = await connect(http, live_stack, sub="flooder")
        for _ in range(400):
            if flooder.ws.closed:
                break
            await flooder.ws.send_json({"type": "ping"})
        while (await flooder.ws.receive(timeout=10)).type not in CLOSED:
            pass
        assert flooder.ws.close_code == 4008
        calm, welcome = await connect(http, live_stack, sub="calm")
        await calm.send(type="ping")
        await calm.next(is_type("pong"))
        await calm.ws.close()


async def test_resume_on_another_edge_while_the_agent_keeps_sending_loses_and_doubles_nothing(
        live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, live_stack, sub="resumer")
        conversation_id = await start_conversation(visitor)
        agent, _ = await connect(http, live_stack, sub="bob", role="agent", edge="edge-b")
        await agent.send(type="claim", conversation_id=conversation_id, cid="c")
        await agent.next(is_type("ack", cid="c"))
        await visitor.next(is_type("state", status="human"))
        total = 30

        async def agent_sends() -> None:
            for n in range(total):
                await agent.send(type="send", cid=f"a{n}", conversation_id=conversation_id, text=f"message {n}")
                await agent.next(is_type("ack", cid=f"a{n}"))
                await asyncio.sleep(0.01)

        sending = asyncio.create_task(agent_sends())
        # The visitor hops between the edges, resuming from the last seq it saw each time.
        for hop in range(4):
            await asyncio.sleep(0.05)
            last_seq = max(f["seq"] for f in visitor.stored(conversation_id))
            frames_before = [f for f in visitor.frames]
            await visitor.ws.close()
            visitor, welcome = await connect(http, live_stack, sub="resumer",
                                             edge="edge-b" if hop % 2 == 0 else None,
                                             resume=[{"conversation_id": conversation_id, "after_seq": last_seq}])
            assert welcome["resume"] == [{"conversation_id": conversation_id, "result": "ok"}]
            visitor.frames = frames_before + visitor.frames
            visitor._read = len(visitor.frames)
        await sending
        await visitor.next(lambda f: f["type"] == "msg" and f.get("text") == f"message {total - 1}")
        texts = [f["text"] for f in visitor.stored(conversation_id) if f["type"] == "msg"
                 and f["sender"]["type"] == "agent"]
        assert texts == [f"message {n}" for n in range(total)]
        seqs = [f["seq"] for f in visitor.stored(conversation_id)]
        assert seqs == sorted(set(seqs))
        await visitor.ws.close()
        await agent.ws.close()


async def test_a_state_change_made_while_the_visitor_was_away_arrives_on_resume(live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, live_stack, sub="away-visitor")
        conversation_id = await start_conversation(visitor)
        last_seq = max(f["seq"] for f in visitor.stored(conversation_id))
        await visitor.ws.close()
        agent, _ = await connect(http, live_stack, sub="cora", role="agent")
        await agent.send(type="claim", conversation_id=conversation_id, cid="c")
        await agent.next(is_type("ack", cid="c"))
        await agent.send(type="close", conversation_id=conversation_id, cid="z")
        await agent.next(is_type("ack", cid="z"))
        visitor, welcome = await connect(http, live_stack, sub="away-visitor", edge="edge-b",
                                         resume=[{"conversation_id": conversation_id, "after_seq": last_seq}])
        human = await visitor.next(is_type("state", status="human"))
        closed = await visitor.next(is_type("state", status="closed"))
        assert human["seq"] < closed["seq"] and closed["reason"] == "close"
        # A new visitor message reopens it as `ai`, and the AI answers.
        await visitor.send(type="send", cid="back", conversation_id=conversation_id, text="怎么退货？")
        reopened = await visitor.next(is_type("state", status="ai"))
        assert reopened["reason"] == "reopen"
        await visitor.next(lambda f: f["type"] == "msg" and f["sender"]["type"] == "ai" and f["seq"] > reopened["seq"])
        await visitor.ws.close()
        await agent.ws.close()


@pytest.fixture
def slow_upstream_config() -> FakeUpstreamConfig:
    return FakeUpstreamConfig(ttft_s=0.2, chunk_count=40, chunk_interval_s=0.1, reply="慢慢地回答" * 8)


async def test_an_ai_reply_in_flight_when_an_agent_claims_is_never_delivered_or_stored(
        upstream_stack: Stack, upstream_port: int, slow_upstream_config: FakeUpstreamConfig, tmp_path: Path) -> None:
    async with FakeUpstream(slow_upstream_config, port=upstream_port), aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, upstream_stack, sub="inflight")
        await visitor.send(type="send", cid="q", text="讲个长故事")
        first_delta = await visitor.next(is_type("ai_delta"))
        conversation_id = first_delta["conversation_id"]
        agent, _ = await connect(http, upstream_stack, sub="dan", role="agent")
        await agent.send(type="claim", conversation_id=conversation_id, cid="c")
        await agent.next(is_type("ack", cid="c"))
        human = await visitor.next(is_type("state", status="human"))
        await asyncio.sleep(40 * 0.1 + 1.0)  # the rest of the answer would have streamed by now
        await visitor.drain()
        after = visitor.frames[visitor.frames.index(human) + 1:]
        assert not [f for f in after if f["type"] == "ai_delta"], "deltas after the claim"
        assert not [f for f in visitor.frames if f["type"] == "msg" and f["sender"]["type"] == "ai"]
        async with http.get(f"{upstream_stack.base_url}/v1/sessions/{conversation_id}/messages",
                            headers={"Authorization": f"Bearer {token(sub='inflight')}"}) as response:
            roles = [m["role"] for m in (await response.json())["messages"]]
        assert roles == ["user"]
        await visitor.ws.close()
        await agent.ws.close()


async def test_no_answer_hands_off_and_without_agents_the_visitor_gets_the_offline_notice(live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, live_stack, sub="unknown-asker")
        await visitor.send(type="send", cid="q", text="Can you explain quantum chromodynamics to me?")
        fallback = await visitor.next(lambda f: f["type"] == "msg" and f["sender"]["type"] == "ai")
        waiting = await visitor.next(is_type("state", status="waiting_human"))
        assert waiting["reason"] == "no_answer" and waiting["seq"] > fallback["seq"]
        notice = await visitor.next(lambda f: f["type"] == "msg" and f["sender"]["type"] == "system")
        assert notice["seq"] > waiting["seq"] and notice["text"]
        await visitor.ws.close()


async def test_with_an_agent_online_a_handoff_stores_no_offline_notice(live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        agent, _ = await connect(http, live_stack, sub="present-agent", role="agent", edge="edge-b")
        visitor, _ = await connect(http, live_stack, sub="lucky-visitor")
        conversation_id = await start_conversation(visitor)
        nc = await nats.connect(live_stack.nats_url)
        try:  # the agent's presence is in the shared bucket before the visitor asks
            presence = await nc.jetstream().key_value("kefu_presence")
            async with asyncio.timeout(20):
                while True:
                    try:
                        await presence.get("shop1.present-agent")
                        break
                    except nats.js.errors.KeyNotFoundError:
                        await asyncio.sleep(0.1)
        finally:
            await nc.close()
        await visitor.send(type="handoff", conversation_id=conversation_id, cid="h")
        await visitor.next(is_type("ack", cid="h"))
        await agent.next(lambda f: f["type"] == "queue_update" and any(
            c["conversation_id"] == conversation_id for c in f["conversations"]))
        await visitor.drain(quiet_s=1.0)
        assert not [f for f in visitor.frames if f["type"] == "msg" and f["sender"]["type"] == "system"]
        await agent.ws.close()
        await visitor.ws.close()


async def test_a_blacklisted_visitor_is_closed_and_refused(live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, live_stack, sub="troll", edge="edge-b")
        await start_conversation(visitor)
        agent_auth = {"Authorization": f"Bearer {token(sub='mod', role='agent')}"}
        async with http.post(f"{live_stack.base_url}/v1/blacklist", json={"visitor_id": "troll", "reason": "spam"},
                             headers=agent_auth) as response:
            assert response.status == 201, await response.text()
            entry = await response.json()
        # The other edge hears of it through its watch and closes the open socket.
        async with asyncio.timeout(20):
            while (message := await visitor.ws.receive()).type not in CLOSED:
                visitor.frames.append(json.loads(message.data))
        assert visitor.ws.close_code == 4003 and visitor.frames[-1]["code"] == "blocked", visitor.frames[-3:]
        ws = await http.ws_connect(url(live_stack))
        await ws.send_json({"type": "hello", "token": token(sub="troll")})
        while (await ws.receive(timeout=10)).type not in CLOSED:
            pass
        assert ws.close_code == 4003
        # Another visitor of the tenant is not affected; lifting the entry lets the visitor back.
        other, _ = await connect(http, live_stack, sub="not-a-troll")
        await other.ws.close()
        async with http.delete(f"{live_stack.base_url}/v1/blacklist/{entry['id']}", headers=agent_auth) as response:
            assert response.status == 204
        for _ in range(100):
            ws = await http.ws_connect(url(live_stack))
            await ws.send_json({"type": "hello", "token": token(sub="troll")})
            message = await ws.receive(timeout=10)
            await ws.close()
            if message.type is aiohttp.WSMsgType.TEXT and json.loads(message.data)["type"] == "welcome":
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the visitor stayed blocked after the entry was deleted")


@pytest.fixture(scope="module")
def short_history_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Conversations keep their 12 newest events (session service and edge read the same setting); a
    socket's send queue holds 8 frames, fewer than a replay of the kept history."""
    data_dir = tmp_path_factory.mktemp("short-history")
    stack = start_stack(data_dir, {
        "KEFU_RATE_LIMIT_RPS": "1000", "KEFU_MAX_HISTORY_MESSAGES": "12", "KEFU_WS_SEND_QUEUE": "8",
        **faq_plugins_env(data_dir)})
    try:
        yield stack
    finally:
        stack.stop()


async def test_a_resume_from_before_the_kept_history_gets_resync_and_what_is_kept(
        short_history_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, short_history_stack, sub="forgetful")
        conversation_id = await start_conversation(visitor)
        first_seq = min(f["seq"] for f in visitor.stored(conversation_id))
        for n in range(6):
            await visitor.send(type="send", cid=f"m{n}", conversation_id=conversation_id, text="怎么退货？")
            await visitor.next(is_type("ack", cid=f"m{n}"))
            await visitor.next(lambda f: f["type"] == "msg" and f["sender"]["type"] == "ai")
        await visitor.ws.close()
        again, welcome = await connect(http, short_history_stack, sub="forgetful",
                                       resume=[{"conversation_id": conversation_id, "after_seq": first_seq}])
        assert welcome["resume"] == [{"conversation_id": conversation_id, "result": "resync"}]
        resync = await again.next(is_type("resync", conversation_id=conversation_id))
        assert resync["reason"]
        await again.drain()
        replayed = again.stored(conversation_id)
        # All twelve kept events, though the send queue holds eight: a replay is not a slow reader.
        assert len(replayed) == 12 and [f["seq"] for f in replayed] == sorted(f["seq"] for f in replayed)
        # A resume inside the kept history is an ordinary one.
        await again.ws.close()
        third, welcome = await connect(http, short_history_stack, sub="forgetful",
                                       resume=[{"conversation_id": conversation_id, "after_seq": replayed[-2]["seq"]}])
        assert welcome["resume"] == [{"conversation_id": conversation_id, "result": "ok"}]
        await third.drain()
        assert [f["seq"] for f in third.stored(conversation_id)] == [replayed[-1]["seq"]]
        await third.ws.close()


async def test_http_chat_into_a_conversation_a_human_holds_is_stored_and_not_answered(live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        visitor, _ = await connect(http, live_stack, sub="http-visitor")
        conversation_id = await start_conversation(visitor)
        agent, _ = await connect(http, live_stack, sub="erin", role="agent", edge="edge-b")
        await agent.send(type="claim", conversation_id=conversation_id, cid="c")
        await agent.next(is_type("ack", cid="c"))
        body = {"message": "多久发货？", "session_id": conversation_id}
        async with http.post(f"{live_stack.base_url}/v1/chat", json=body,
                             headers={"Authorization": f"Bearer {token(sub='http-visitor')}"}) as response:
            assert response.status == 200
            events = [(event.event, event.json()) async for event in read_sse(response)]
        assert [name for name, _ in events] == ["session", "done"]
        assert events[-1][1]["finish_reason"] == "human"
        # The agent sees it live, in the same conversation; no AI answer follows it.
        asked = await agent.next(lambda f: f["type"] == "msg" and f["text"] == "多久发货？")
        assert asked["sender"]["id"] == "http-visitor"
        await visitor.drain()
        assert not [f for f in visitor.stored(conversation_id) if f["type"] == "msg"
                    and f["sender"]["type"] == "ai" and f["seq"] > asked["seq"]]
        await visitor.ws.close()
        await agent.ws.close()


async def test_a_deleted_conversation_closes_its_visitor_sockets_and_leaves_its_agent_on_every_edge(
        live_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        agent, _ = await connect(http, live_stack, sub="del-agent", role="agent", edge="edge-b")
        visitor, _ = await connect(http, live_stack, sub="del-visitor")
        other_tab, _ = await connect(http, live_stack, sub="del-visitor", edge="edge-b")
        conversation_id = await start_conversation(visitor)
        await other_tab.send(type="send", cid="t2", conversation_id=conversation_id, text="还有一个问题")
        await other_tab.next(is_type("ack", cid="t2"))
        await agent.send(type="claim", conversation_id=conversation_id, cid="c")
        await agent.next(is_type("ack", cid="c"))
        # The agent holds another conversation too: its socket must stay open for that one.
        kept_visitor, _ = await connect(http, live_stack, sub="del-visitor-2")
        kept_id = await start_conversation(kept_visitor)
        await agent.send(type="claim", conversation_id=kept_id, cid="k")
        await agent.next(is_type("ack", cid="k"))

        deleted = await http.delete(f"{live_stack.base_url}/v1/sessions/{conversation_id}",
                                    headers={"Authorization": f"Bearer {token(sub='del-visitor')}"})
        assert deleted.status == 204
        for tab in (visitor, other_tab):  # both edges, the one that served the DELETE and the other
            gone = await tab.next(is_type("error", code="not_found"))
            assert gone["message"] == "this conversation was deleted"
            assert (await tab.ws.receive(timeout=10)).type in CLOSED and tab.ws.close_code == 4003
        notice = await agent.next(is_type("resync", conversation_id=conversation_id))
        assert notice["reason"] == "the conversation was deleted"
        # The agent's socket goes on with the conversation it still holds.
        await kept_visitor.send(type="send", cid="q", conversation_id=kept_id, text="还在吗？")
        asked = await agent.next(lambda f: f["type"] == "msg" and f["text"] == "还在吗？")
        assert asked["conversation_id"] == kept_id
