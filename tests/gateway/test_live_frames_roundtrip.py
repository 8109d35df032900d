"""Every server frame type: encoded by gateway.live.frames.encode, read back into the same value, and valid
against docs/asyncapi.yaml."""

from __future__ import annotations

import json
import typing

import msgspec
import pytest

from gateway.live.frames import (
    Ack,
    AiDelta,
    Citation,
    ErrorFrame,
    MsgEvent,
    Nack,
    NoteEvent,
    Pong,
    QueueEntry,
    QueuePosition,
    QueueUpdate,
    ReadEvent,
    ResumeResult,
    Resync,
    Sender,
    ServerFrame,
    StateEvent,
    TypingEvent,
    Welcome,
    encode,
    kind_of,
    relay,
    relayed,
)
from tests.gateway.asyncapi_support import operation_messages, server_frame_problems

C = "c" * 32
AGENT = Sender("agent", "ann", "Ann")

SAMPLES: list[ServerFrame] = [
    Welcome("visitor", C, "ai", 30.0, 1_700_000_000_000, (ResumeResult(C, "ok"),), "Hi! 您好"),
    Welcome("visitor", None, "ai", 30.0, 1, ()),
    Welcome("agent", None, None, 5.0, 1, (ResumeResult(C, "resync"),)),
    Ack("c1", 7, False),
    Ack(None, 0, True),
    Nack("send", "limit", "too many messages; retry in 2 s", "c1", C),
    Nack("typing", "forbidden", "not subscribed to this conversation"),
    MsgEvent(C, 3, 1.5, "m" * 32, Sender("visitor", "alice"), "多久发货？"),
    MsgEvent(C, 4, 1.5, "m" * 32, Sender("visitor", "alice"), "hi", cid="c1"),
    MsgEvent(C, 5, 2.5, "a" * 32, Sender("ai", "ai"), "7 天内可退 [1]",
             [Citation("returns", "退换货", "https://x.example/r", "returns-1-0", "7 天内可退")]),
    MsgEvent(C, 6, 2.5, "a" * 32, Sender("ai", "ai"), "I do not know", []),
    MsgEvent(C, 7, 3.0, "g" * 32, AGENT, "Hello, Ann here"),
    NoteEvent(C, 8, 3.5, "n" * 32, AGENT, "VIP", "n1"),
    StateEvent(C, 9, 4.0, "human", 3, "claim", "ann", "Ann"),
    StateEvent(C, 10, 4.0, "ai", 4, "release"),
    AiDelta(C, "a" * 32, "7 天"),
    TypingEvent(C, True, Sender("visitor", "alice")),
    ReadEvent(C, 9, AGENT),
    QueuePosition(C, 1),
    QueueUpdate((QueueEntry(C, 1_700_000_000.5, "想找人工"),)),
    QueueUpdate(()),
    Resync(C, "the conversation was deleted"),
    Pong(),
    ErrorFrame("invalid_frame", "cid: required string of 1-64 characters"),
]


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda frame: kind_of(frame))
def test_server_frame_round_trips_and_matches_the_asyncapi_document(frame: ServerFrame) -> None:
    text = encode(frame)
    assert msgspec.json.decode(text, type=ServerFrame) == frame
    data = json.loads(text)
    assert data["type"] == kind_of(frame)
    assert server_frame_problems(data) == []


def test_every_server_frame_type_is_sampled_and_documented() -> None:
    types = {str(member.__struct_config__.tag) for member in typing.get_args(ServerFrame)}
    documented = {message["payload"]["properties"]["type"]["const"] for message in operation_messages("send").values()}
    assert types == documented
    assert {kind_of(frame) for frame in SAMPLES} == types


def test_live_frames_cross_edges_unchanged() -> None:
    for frame in (AiDelta(C, "a" * 32, "hi"), TypingEvent(C, False, AGENT), ReadEvent(C, 3, Sender("visitor", "v"))):
        assert relayed(json.loads(json.dumps(relay(frame)))) == frame
    assert relayed({"type": "welcome"}) is None and relayed("nonsense") is None
