"""Every WebSocket frame of live chat as a typed value, with the one decoder and the one encoder (pure).

The shapes are docs/asyncapi.yaml's: client frames are decoded by `decode` (a bad one raises
`FrameError` with the contract's code), server frames are encoded by `encode`; nothing else
builds a frame.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.errors import FrameError
from kefu.session.v1 import session_pb2

MAX_FRAME_BYTES = 65536
"""The contract: at most 64 KiB a frame; aiohttp closes a larger one with 1009."""
MAX_CID_CHARS = 64
MAX_ID_CHARS = 128
MAX_RESUME = 32
"""Conversations one `hello` may resume."""
MAX_SEQ = 2**63 - 1
MAX_REASON_CHARS = 200
MAX_AGENT_ID_CHARS = 256

# Close codes (docs/api.md "Close codes").
CLOSE_AUTH_FAILED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_RATE_LIMITED = 4008
CLOSE_BAD_FRAMES = 4400
CLOSE_SERVER_ERROR = 1011
CLOSE_TOO_BIG = 1009
CLOSE_DRAINING = 1012
CLOSE_TOO_SLOW = 1013

SENDER_TYPES = {"user": "visitor", "assistant": "ai", "agent": "agent", "system": "system"}

ConversationId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
Cid = Annotated[str, Meta(min_length=1, max_length=MAX_CID_CHARS)]
Seq = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
Text = Annotated[str, Meta(min_length=1, pattern=r"\S")]
"""Not blank; its length limit is a setting (KEFU_MAX_MESSAGE_CHARS), checked in `decode`."""


class _Frame(Struct, frozen=True, tag_field="type"):
    """Every frame names itself in `type` (the tag)."""


# -- client frames -------------------------------------------------------------------------------

class ResumePoint(Struct, frozen=True):
    conversation_id: ConversationId
    after_seq: Seq = 0


class Hello(_Frame, tag="hello", frozen=True):
    token: Annotated[str, Meta(min_length=1)] | None = None
    resume: Annotated[tuple[ResumePoint, ...], Meta(max_length=MAX_RESUME)] | None = None

    def __post_init__(self) -> None:
        if self.resume and len({p.conversation_id for p in self.resume}) != len(self.resume):
            raise ValueError("resume: a conversation is listed twice")

    @property
    def points(self) -> tuple[ResumePoint, ...]:
        return self.resume or ()


class Send(_Frame, tag="send", frozen=True):
    cid: Cid
    text: Text
    conversation_id: ConversationId | None = None


class Ping(_Frame, tag="ping", frozen=True):
    pass


class Typing(_Frame, tag="typing", frozen=True):
    conversation_id: ConversationId
    on: bool = True


class Read(_Frame, tag="read", frozen=True):
    conversation_id: ConversationId
    up_to_seq: Seq


class Handoff(_Frame, tag="handoff", frozen=True):
    conversation_id: ConversationId
    reason: Annotated[str, Meta(max_length=MAX_REASON_CHARS)] | None = None
    cid: Cid | None = None


class Claim(_Frame, tag="claim", frozen=True):
    conversation_id: ConversationId
    cid: Cid | None = None


class Release(_Frame, tag="release", frozen=True):
    conversation_id: ConversationId
    to: Literal["ai", "queue"] = "ai"
    cid: Cid | None = None


class Transfer(_Frame, tag="transfer", frozen=True):
    conversation_id: ConversationId
    agent: Annotated[str, Meta(min_length=1, max_length=MAX_AGENT_ID_CHARS)]
    cid: Cid | None = None


class Close(_Frame, tag="close", frozen=True):
    conversation_id: ConversationId
    cid: Cid | None = None


class Note(_Frame, tag="note", frozen=True):
    conversation_id: ConversationId
    cid: Cid
    text: Text


class Presence(_Frame, tag="presence", frozen=True):
    status: Literal["online", "away"]


ClientFrame = Hello | Send | Ping | Typing | Read | Handoff | Claim | Release | Transfer | Close | Note | Presence
AgentFrame = Claim | Release | Transfer | Close | Note | Presence
"""Frames only agents and admins may send."""

CLIENT_TYPES = frozenset({"hello", "send", "typing", "read", "handoff", "ping",
                          "claim", "release", "transfer", "close", "note", "presence"})
"""Every client frame type: the contract's, plus `presence` (agents: online/away)."""
AGENT_TYPES = frozenset({"claim", "release", "transfer", "close", "note", "presence"})


_CLIENT_DECODER = msgspec.json.Decoder(ClientFrame)


def decode(raw: str | bytes, *, max_text_chars: int) -> ClientFrame:
    """One client text frame -> a typed frame; FrameError (invalid_json, unknown_type, invalid_frame) says why not."""
    try:
        frame: ClientFrame = _CLIENT_DECODER.decode(raw)
    except msgspec.ValidationError as error:
        raise _refusal(raw, str(error)) from None
    except msgspec.DecodeError:
        raise _undecodable(raw) from None
    except RecursionError:
        raise FrameError("invalid_json", "frame is not JSON") from None
    if isinstance(frame, Send | Note) and len(frame.text) > max_text_chars:
        raise FrameError("invalid_frame", f"text: longer than {max_text_chars} characters")
    return frame


def _refusal(raw: str | bytes, detail: str) -> FrameError:
    """Which rule a frame the typed decoder refused broke (only bad frames are read twice)."""
    try:
        data = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return _undecodable(raw)
    if not isinstance(data, dict):
        return FrameError("invalid_frame", "frame must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        return FrameError("invalid_frame", "type: required string")
    if kind not in CLIENT_TYPES:
        return FrameError("unknown_type", f"type: unknown frame type {kind[:40]!r}")
    return FrameError("invalid_frame", detail)


def _undecodable(raw: str | bytes) -> FrameError:
    # msgspec refuses "\ud800" escapes (lone surrogates, which no UTF-8, protobuf or JWT check can
    # carry) like malformed JSON; the contract calls those an invalid frame (issue 17).
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if "\\u" in text:
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            pass
        else:
            return FrameError("invalid_frame", "strings must be valid Unicode text (no lone surrogates)")
    return FrameError("invalid_json", "frame is not JSON")


def kind_of(frame: _Frame) -> str:
    """The frame's `type`."""
    return str(type(frame).__struct_config__.tag)


# -- server frames -------------------------------------------------------------------------------

class Sender(Struct, frozen=True):
    """Who wrote a message, or (as the contract's `Peer`) who is typing or reading."""
    type: str
    id: str
    name: str | UnsetType = UNSET


class Citation(Struct, frozen=True):
    document_id: str
    title: str
    url: str
    chunk_id: str
    quote: str


class ResumeResult(Struct, frozen=True):
    conversation_id: str
    result: Literal["ok", "resync"]


class Welcome(_Frame, tag="welcome", frozen=True):
    role: str
    conversation_id: str | None
    status: str | None
    heartbeat_s: float
    epoch: int
    resume: tuple[ResumeResult, ...]
    greeting: str | UnsetType = UNSET
    """Visitors only."""


class Ack(_Frame, tag="ack", frozen=True):
    cid: str | None
    seq: int
    duplicate: bool = False


class Nack(_Frame, tag="nack", frozen=True):
    """A refused request. Its type cannot go in `type`, which every frame names itself by: it goes in
    `request_type`."""
    request_type: str
    code: str
    message: str
    cid: str | UnsetType = UNSET
    conversation_id: str | UnsetType = UNSET


class MsgEvent(_Frame, tag="msg", frozen=True):
    conversation_id: str
    seq: int
    ts: float
    message_id: str
    sender: Sender
    text: str
    citations: list[Citation] | UnsetType = UNSET
    """On every AI message, on no other."""
    cid: str | UnsetType = UNSET
    """Only on the socket that sent it."""


class NoteEvent(_Frame, tag="note", frozen=True):
    conversation_id: str
    seq: int
    ts: float
    message_id: str
    sender: Sender
    text: str
    cid: str | UnsetType = UNSET


class StateEvent(_Frame, tag="state", frozen=True):
    conversation_id: str
    seq: int
    ts: float
    status: str
    version: int
    reason: str
    assignee: str | UnsetType = UNSET
    assignee_name: str | UnsetType = UNSET

    @property
    def holder(self) -> str:
        """The agent holding the conversation ("" when none)."""
        return self.assignee if isinstance(self.assignee, str) else ""


class AiDelta(_Frame, tag="ai_delta", frozen=True):
    conversation_id: str
    message_id: str
    delta: str


class TypingEvent(_Frame, tag="typing", frozen=True):
    conversation_id: str
    on: bool
    sender: Sender


class ReadEvent(_Frame, tag="read", frozen=True):
    conversation_id: str
    up_to_seq: int
    reader: Sender


class QueuePosition(_Frame, tag="queue", frozen=True):
    conversation_id: str
    position: int


class QueueEntry(Struct, frozen=True):
    conversation_id: str
    waiting_since: float
    preview: str


class QueueUpdate(_Frame, tag="queue_update", frozen=True):
    conversations: tuple[QueueEntry, ...]


class Resync(_Frame, tag="resync", frozen=True):
    conversation_id: str
    reason: str


class Pong(_Frame, tag="pong", frozen=True):
    pass


class ErrorFrame(_Frame, tag="error", frozen=True):
    code: str
    message: str


StoredEvent = MsgEvent | NoteEvent | StateEvent
"""An event of the conversation's log: each socket gets it once, in seq order."""
LiveFrame = AiDelta | TypingEvent | ReadEvent
"""Not stored: relayed to the other edges' sockets of the conversation."""
ServerFrame = (Welcome | Ack | Nack | MsgEvent | NoteEvent | StateEvent | AiDelta | TypingEvent | ReadEvent
               | QueuePosition | QueueUpdate | Resync | Pong | ErrorFrame)

_ENCODER = msgspec.json.Encoder()


def encode(frame: ServerFrame) -> str:
    """The JSON text of a server frame (UTF-8, not ASCII-escaped)."""
    return _ENCODER.encode(frame).decode()


def relay(frame: LiveFrame) -> dict[str, object]:
    """A live frame as the JSON object another edge's `relayed` reads back."""
    built: dict[str, object] = msgspec.to_builtins(frame)
    return built


def relayed(data: object) -> LiveFrame | None:
    """A live frame another edge relayed; None when it is not one."""
    try:
        frame: LiveFrame = msgspec.convert(data, LiveFrame)
    except msgspec.ValidationError:
        return None
    return frame


def message_id_for(tenant: str, subject: str, cid: str) -> str:
    """The stored id of a message a client sent: the same `cid` from the same client is one message.

    The conversation is left out on purpose: the first `send` of a conversation has no
    conversation id yet, and its retry (after a drop, now naming the conversation) must
    map to the same message.
    """
    return hashlib.sha256(f"{tenant}\x00{subject}\x00{cid}".encode()).hexdigest()[:32]


def stored_event(conversation_id: str, message: session_pb2.Message, owner: str) -> StoredEvent:
    """A stored event of the conversation log as a frame: `msg`, `state` or `note` (without `cid`).

    Notes are for agents only; whoever sends frames to a visitor must leave them out (the
    session service never gives a visitor principal a note in the first place)."""
    if message.kind == "state":
        state = message.state
        return StateEvent(conversation_id, message.seq, message.created_at, state.status, state.version,
                          state.reason, state.assignee or UNSET,
                          (state.assignee_name or state.assignee) if state.assignee else UNSET)
    sender_type = SENDER_TYPES.get(message.role, "system")
    if sender_type == "visitor":
        sender = Sender("visitor", message.sender_id or owner)
    elif sender_type == "agent":
        sender = Sender("agent", message.sender_id, message.sender_name or UNSET)
    else:
        sender = Sender(sender_type, sender_type)
    if message.kind == "note":
        return NoteEvent(conversation_id, message.seq, message.created_at, message.id, sender, message.content)
    return MsgEvent(conversation_id, message.seq, message.created_at, message.id, sender, message.content,
                    citations_of(message.citations) if sender_type == "ai" else UNSET)


def citations_of(citations: Iterable[session_pb2.Citation]) -> list[Citation]:
    return [Citation(c.document_id, c.title, c.url, c.chunk_id, c.quote) for c in citations]


def event_frame(conversation_id: str, message: session_pb2.Message, owner: str) -> dict[str, object]:
    """A stored event as the JSON object the HTTP history endpoints list (the same shape as on the socket)."""
    built: dict[str, object] = msgspec.to_builtins(stored_event(conversation_id, message, owner))
    return built


def citations_json(citations: Iterable[session_pb2.Citation]) -> list[dict[str, str]]:
    """The sources an AI reply cites, as the history endpoints give them."""
    built: list[dict[str, str]] = msgspec.to_builtins(citations_of(citations))
    return built
