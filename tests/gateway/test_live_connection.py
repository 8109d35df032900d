"""gateway.live.connection: what one socket is sent, in which order, and what it never gets twice."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from gateway.auth import Principal
from gateway.live.connection import Connection
from gateway.live.frames import Ack, MsgEvent, NoteEvent, Pong, Sender, StateEvent, Welcome

C = "c" * 32


class RecordingSocket:
    """The WebSocket side of a Connection: what was sent on the wire, and the close."""

    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []
        self.closed_with: int | None = None

    async def send_str(self, data: str) -> None:
        self.sent.append(json.loads(data))

    async def close(self, *, code: int, message: bytes = b"", drain: bool = True) -> bool:
        self.closed_with = code
        return True


def connection(role: str) -> tuple[Connection, RecordingSocket]:
    ws = RecordingSocket()
    opened = Connection(ws, queue_size=64, transport=None)  # type: ignore[arg-type]  # the wire side only
    opened.greet(Principal("shop1", "alice" if role == "visitor" else "ann", role))
    return opened, ws


def msg(seq: int, message_id: str = "m") -> MsgEvent:
    return MsgEvent(C, seq, 1.0, message_id * 32, Sender("visitor", "alice"), f"text {seq}")


async def sent(ws: RecordingSocket, opened: Connection) -> list[dict[str, object]]:
    await opened.finish(1.0)
    return ws.sent


async def test_connection_sends_each_stored_event_once_in_seq_order() -> None:
    opened, ws = connection("visitor")
    opened.follow(C, 1, [msg(1), msg(2), msg(3)])  # a replay from after_seq 1
    opened.deliver(msg(3))  # the live copy of what the replay had
    opened.deliver(msg(4))
    assert opened.follows(C) and opened.conversations == frozenset({C})
    assert [frame["seq"] for frame in await sent(ws, opened)] == [2, 3, 4]
    assert ws.closed_with == 1000


async def test_connection_never_gives_a_visitor_a_note() -> None:
    visitor, visitor_ws = connection("visitor")
    agent, agent_ws = connection("agent")
    note = NoteEvent(C, 5, 1.0, "n" * 32, Sender("agent", "ann"), "VIP")
    state = StateEvent(C, 6, 1.0, "human", 2, "claim", "ann", "Ann")
    for opened in (visitor, agent):
        opened.follow(C, 0, [])
        opened.deliver(note)
        opened.deliver(state)
    assert [frame["type"] for frame in await sent(visitor_ws, visitor)] == ["state"]
    assert [frame["type"] for frame in await sent(agent_ws, agent)] == ["note", "state"]


async def test_connection_echoes_its_own_cid_only_on_its_own_message() -> None:
    opened, ws = connection("visitor")
    opened.remember_cid("m" * 32, "cid-1")
    opened.follow(C, 0, [])
    opened.deliver(msg(1, "m"))
    opened.deliver(msg(2, "x"))
    first, second = await sent(ws, opened)
    assert first["cid"] == "cid-1" and "cid" not in second


async def test_connection_sends_the_welcome_before_what_was_held() -> None:
    opened, ws = connection("visitor")
    opened.hold()
    opened.follow(C, 0, [msg(1)])
    opened.send(Ack("c1", 1))
    await asyncio.sleep(0)
    assert ws.sent == []
    opened.release(Welcome("visitor", C, "ai", 30.0, 1, ()))
    assert [frame["type"] for frame in await sent(ws, opened)] == ["welcome", "msg", "ack"]


async def test_connection_sends_nothing_once_closing() -> None:
    opened, ws = connection("agent")
    opened.send(Pong())
    opened.close(4003, "forbidden")
    opened.send(Pong())
    opened.deliver(msg(1))
    assert await sent(ws, opened) == [{"type": "pong"}] and ws.closed_with == 4003


def test_connection_frame_budget_refills_at_its_rate() -> None:
    opened = Connection(web.WebSocketResponse(), queue_size=8, transport=None)
    assert all(opened.take_frame_token(rate=0.001, burst=3) for _ in range(3))
    assert not opened.take_frame_token(rate=0.001, burst=3)
