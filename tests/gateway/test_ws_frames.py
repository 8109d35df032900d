"""Live-chat frames (the decoder and the stored events, pure), the per-socket writer, and the socket lifecycle of
an edge without backends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import WSMsgType
from pytest_aiohttp import AiohttpClient

from devtools.mint_token import mint
from gateway import keys
from gateway.app import create_app
from gateway.errors import FrameError
from gateway.live.connection import Connection
from gateway.live.frames import (
    Claim,
    Close,
    Handoff,
    Hello,
    Nack,
    Note,
    Ping,
    Pong,
    Presence,
    Read,
    Release,
    ResumePoint,
    Send,
    Transfer,
    Typing,
    decode,
    encode,
    event_frame,
    message_id_for,
)
from gateway.settings import GatewaySettings
from kefu.session.v1 import session_pb2

SECRET = "ws-frames-test-secret-0123456789abcdef"


def parse(frame: object, max_text_chars: int = 100) -> object:
    return decode(frame if isinstance(frame, str | bytes) else json.dumps(frame), max_text_chars=max_text_chars)


def test_parse_frame_reads_hello_send_and_ping() -> None:
    assert parse({"type": "hello"}) == Hello(None, None)
    assert parse({"type": "hello", "token": "t", "resume": [{"conversation_id": "c", "after_seq": 7}]}) == \
        Hello("t", (ResumePoint("c", 7),))
    assert parse({"type": "send", "cid": "a" * 64, "text": "你好"}) == Send("a" * 64, "你好", None)
    assert parse({"type": "send", "cid": "1", "conversation_id": "c", "text": "x" * 100}) == Send("1", "x" * 100, "c")
    assert parse({"type": "ping"}) == Ping()
    assert parse(b'{"type": "send", "cid": "1", "text": "\\ud83d\\ude00"}') == Send("1", "\U0001f600")


def test_parse_frame_reads_every_other_client_frame() -> None:
    assert parse({"type": "typing", "conversation_id": "c", "on": False}) == Typing("c", False)
    assert parse({"type": "read", "conversation_id": "c", "up_to_seq": 12}) == Read("c", 12)
    assert parse({"type": "handoff", "conversation_id": "c"}) == Handoff("c", None, None)
    assert parse({"type": "handoff", "conversation_id": "c", "reason": "r", "cid": "h"}) == Handoff("c", "r", "h")
    assert parse({"type": "claim", "conversation_id": "c", "cid": "k"}) == Claim("c", "k")
    assert parse({"type": "release", "conversation_id": "c", "to": "queue"}) == Release("c", "queue", None)
    assert parse({"type": "release", "conversation_id": "c"}) == Release("c", "ai", None)
    assert parse({"type": "transfer", "conversation_id": "c", "agent": "bob"}) == Transfer("c", "bob", None)
    assert parse({"type": "close", "conversation_id": "c"}) == Close("c", None)
    assert parse({"type": "note", "conversation_id": "c", "cid": "n", "text": "vip"}) == Note("c", "n", "vip")
    assert parse({"type": "presence", "status": "away"}) == Presence("away")


@pytest.mark.parametrize(("frame", "code"), [
    ("{nope", "invalid_json"),
    ("[1, 2]", "invalid_frame"),
    ({"no": "type"}, "invalid_frame"),
    ({"type": 3}, "invalid_frame"),
    ({"type": "dance"}, "unknown_type"),
    ({"type": "send", "text": "hi"}, "invalid_frame"),
    ({"type": "send", "cid": "", "text": "hi"}, "invalid_frame"),
    ({"type": "send", "cid": "a" * 65, "text": "hi"}, "invalid_frame"),
    ({"type": "send", "cid": "1"}, "invalid_frame"),
    ({"type": "send", "cid": "1", "text": "   "}, "invalid_frame"),
    ({"type": "send", "cid": "1", "text": "x" * 101}, "invalid_frame"),
    ({"type": "send", "cid": "1", "text": "hi", "conversation_id": 5}, "invalid_frame"),
    ({"type": "hello", "token": ""}, "invalid_frame"),
    ({"type": "hello", "resume": {"conversation_id": "c"}}, "invalid_frame"),
    ({"type": "hello", "resume": [{"after_seq": 1}]}, "invalid_frame"),
    ({"type": "hello", "resume": [{"conversation_id": "c", "after_seq": -1}]}, "invalid_frame"),
    ({"type": "hello", "resume": [{"conversation_id": "c", "after_seq": True}]}, "invalid_frame"),
    ({"type": "hello", "resume": [{"conversation_id": "c"}, {"conversation_id": "c"}]}, "invalid_frame"),
    ({"type": "hello", "resume": [{"conversation_id": str(i)} for i in range(33)]}, "invalid_frame"),
    ("[" * 100_000 + "]" * 100_000, "invalid_json"),
    ('{"type": "ping", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "invalid_json"),
    ('{"type": "send", "cid": "1", "text": "\\ud800"}', "invalid_frame"),  # a lone surrogate
    (b"{\"type\": \"ping\"", "invalid_json"),
    ({"type": "typing", "on": True}, "invalid_frame"),
    ({"type": "typing", "conversation_id": "c", "on": "yes"}, "invalid_frame"),
    ({"type": "read", "conversation_id": "c"}, "invalid_frame"),
    ({"type": "release", "conversation_id": "c", "to": "bin"}, "invalid_frame"),
    ({"type": "transfer", "conversation_id": "c"}, "invalid_frame"),
    ({"type": "note", "conversation_id": "c", "text": "no cid"}, "invalid_frame"),
    ({"type": "claim"}, "invalid_frame"),
    ({"type": "claim", "conversation_id": "c", "cid": 7}, "invalid_frame"),
    ({"type": "presence", "status": "asleep"}, "invalid_frame"),
    ({"type": "handoff", "conversation_id": "c", "reason": "x" * 201}, "invalid_frame"),
])
def test_parse_frame_names_what_is_wrong(frame: object, code: str) -> None:
    with pytest.raises(FrameError) as error:
        parse(frame)
    assert error.value.code == code and error.value.message


def test_message_id_for_is_stable_per_visitor_and_cid() -> None:
    first = message_id_for("shop1", "alice", "c-1")
    assert first == message_id_for("shop1", "alice", "c-1") and len(first) == 32 and int(first, 16) >= 0
    assert len({first, message_id_for("shop1", "bob", "c-1"), message_id_for("shop2", "alice", "c-1"),
                message_id_for("shop1", "alice", "c-2")}) == 4


def test_msg_frame_names_the_sender() -> None:
    def frame(role: str) -> dict[str, Any]:  # the JSON the history endpoints list
        message = session_pb2.Message(id="m" * 32, role=role, content="hi", created_at=1.5, seq=9)
        return event_frame("conv", message, "alice")

    assert frame("user") == {"type": "msg", "conversation_id": "conv", "seq": 9, "ts": 1.5, "message_id": "m" * 32,
                             "sender": {"type": "visitor", "id": "alice"}, "text": "hi"}
    assert frame("assistant")["sender"] == {"type": "ai", "id": "ai"}
    assert frame("assistant")["citations"] == [] and "citations" not in frame("agent")
    assert frame("agent")["sender"]["type"] == "agent"


def test_msg_frame_of_an_ai_reply_carries_its_citations() -> None:
    message = session_pb2.Message(id="m" * 32, role="assistant", content="7 天内可退 [1]", created_at=1.5, seq=9,
                                  citations=[session_pb2.Citation(document_id="returns", title="退换货",
                                                                  url="https://x.example/r", chunk_id="returns-1-0",
                                                                  quote="7 天内可退")])
    assert event_frame("conv", message, "alice")["citations"] == [
        {"document_id": "returns", "title": "退换货", "url": "https://x.example/r", "chunk_id": "returns-1-0",
         "quote": "7 天内可退"}]


def test_event_frame_builds_state_and_note_events() -> None:
    state = session_pb2.ConversationState(status="human", version=3, assignee="ann", assignee_name="Ann",
                                          reason="claim", since=2.0)
    event = session_pb2.Message(id="s" * 32, role="system", content="status: human", created_at=2.0, seq=11,
                                kind="state", state=state)
    assert event_frame("conv", event, "alice") == {
        "type": "state", "conversation_id": "conv", "seq": 11, "ts": 2.0, "status": "human", "version": 3,
        "reason": "claim", "assignee": "ann", "assignee_name": "Ann"}
    note = session_pb2.Message(id="n" * 32, role="agent", content="vip", created_at=3.0, seq=12, kind="note",
                               sender_id="ann", sender_name="Ann")
    assert event_frame("conv", note, "alice") == {
        "type": "note", "conversation_id": "conv", "seq": 12, "ts": 3.0, "message_id": "n" * 32,
        "sender": {"type": "agent", "id": "ann", "name": "Ann"}, "text": "vip"}


def test_nack_frame_carries_the_refused_request() -> None:
    assert json.loads(encode(Nack("send", "content_blocked", "no", "c", "x"))) == {
        "type": "nack", "request_type": "send", "cid": "c", "conversation_id": "x",
        "code": "content_blocked", "message": "no"}
    assert json.loads(encode(Nack("typing", "not_supported", "later"))) == {
        "type": "nack", "request_type": "typing", "code": "not_supported", "message": "later"}


class StuckSocket:
    """A WebSocket whose peer stopped reading: every send waits forever."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed_with: int | None = None
        self._never = asyncio.Event()

    async def send_str(self, data: str) -> None:
        self.sent.append(data)
        await self._never.wait()

    async def close(self, *, code: int, message: bytes = b"", drain: bool = True) -> bool:
        self.closed_with = code
        return True


async def test_connection_closes_a_socket_that_stops_reading_with_1013() -> None:
    ws = StuckSocket()
    socket = Connection(ws, queue_size=8, transport=None)  # type: ignore[arg-type]
    for _ in range(8 + 1):  # one in the writer's hands, eight queued
        socket.send(Pong())
        await asyncio.sleep(0)
    assert socket.close_code is None
    socket.send(Pong())
    assert socket.close_code == 1013
    await socket.finish(1.0)
    assert ws.closed_with == 1013 and ws.sent == ['{"type":"pong"}']
    socket.send(Pong())  # ignored once closing
    assert len(ws.sent) == 1


def edge_settings() -> GatewaySettings:
    # Backends point nowhere: a hello without resume needs none of them.
    return GatewaySettings(jwt_secret=SECRET, session_addr="127.0.0.1:9", moderation_addr="127.0.0.1:9",
                           worker_addr="127.0.0.1:9", ws_heartbeat_s=5, rpc_timeout_s=0.5)


async def test_draining_edge_closes_sockets_1012_and_refuses_new_ones(aiohttp_client: AiohttpClient) -> None:
    app = create_app(edge_settings())
    client = await aiohttp_client(app)
    header = {"Authorization": f"Bearer {mint(SECRET, tenant='shop1', subject='v', role='visitor', ttl_s=60)}"}
    ws = await client.ws_connect("/v1/ws", headers=header)
    await ws.send_json({"type": "hello"})
    assert (await ws.receive_json(timeout=15))["type"] == "welcome"
    app[keys.STATE].start_draining()
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE and ws.close_code == 1012
    response = await client.get("/v1/ws", headers=header)
    assert response.status == 503


async def test_plain_http_get_of_the_socket_route_is_426(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(edge_settings()))
    response = await client.get("/v1/ws")
    assert response.status == 426 and (await response.json())["error"]["code"] == "websocket_required"
    assert response.headers["X-Request-Id"]
