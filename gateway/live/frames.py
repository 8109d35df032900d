"""WebSocket frames of live chat: client frames parsed and checked, server frames built (pure)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kefu.session.v1 import session_pb2

MAX_FRAME_BYTES = 65536
"""DESIGN.md: at most 64 KiB a frame; aiohttp closes a larger one with 1009."""
MAX_CID_CHARS = 64
MAX_ID_CHARS = 128
MAX_RESUME = 32
"""Conversations one `hello` may resume."""
MAX_SEQ = 2**63 - 1

# Close codes (DESIGN.md "Live chat").
CLOSE_AUTH_FAILED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_RATE_LIMITED = 4008
CLOSE_BAD_FRAMES = 4400
CLOSE_TOO_BIG = 1009
CLOSE_DRAINING = 1012
CLOSE_TOO_SLOW = 1013

CLIENT_TYPES = frozenset({"hello", "send", "typing", "read", "handoff", "ping",
                          "claim", "release", "transfer", "close", "note"})
"""Every client frame type of the contract; those this edge does not serve yet get a `nack`."""

SENDER_TYPES = {"user": "visitor", "assistant": "ai", "agent": "agent", "system": "system"}


class FrameError(ValueError):
    """A bad client frame: the socket gets `error {code, message}` and one more strike."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ResumePoint:
    conversation_id: str
    after_seq: int


@dataclass(frozen=True, slots=True)
class Hello:
    token: str | None
    resume: tuple[ResumePoint, ...]


@dataclass(frozen=True, slots=True)
class Send:
    cid: str
    conversation_id: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A frame type of the contract that this edge does not handle (yet): refused with a `nack`."""

    type: str
    cid: str | None


ClientFrame = Hello | Send | Ping | Unsupported


def parse_frame(raw: str, *, max_text_chars: int) -> ClientFrame:
    """One client text frame -> a typed frame; FrameError names what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise FrameError("invalid_json", "frame is not JSON") from None
    if not isinstance(data, dict):
        raise FrameError("invalid_frame", "frame must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise FrameError("invalid_frame", "type: required string")
    if kind not in CLIENT_TYPES:
        raise FrameError("unknown_type", f"type: unknown frame type {kind[:40]!r}")
    if kind == "hello":
        return _hello(data)
    if kind == "send":
        return _send(data, max_text_chars)
    if kind == "ping":
        return Ping()
    cid = data.get("cid")
    return Unsupported(kind, cid if isinstance(cid, str) and 0 < len(cid) <= MAX_CID_CHARS else None)


def _hello(data: dict[str, Any]) -> Hello:
    token = data.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        raise FrameError("invalid_frame", "token: must be a non-empty string")
    raw_resume = data.get("resume", [])
    if raw_resume is None:
        raw_resume = []
    if not isinstance(raw_resume, list) or len(raw_resume) > MAX_RESUME:
        raise FrameError("invalid_frame", f"resume: must be a list of at most {MAX_RESUME} items")
    points: list[ResumePoint] = []
    for index, item in enumerate(raw_resume):
        if not isinstance(item, dict):
            raise FrameError("invalid_frame", f"resume[{index}]: must be an object")
        conversation_id = _id(item.get("conversation_id"), f"resume[{index}].conversation_id")
        after_seq = item.get("after_seq", 0)
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or not 0 <= after_seq <= MAX_SEQ:
            raise FrameError("invalid_frame", f"resume[{index}].after_seq: must be an integer >= 0")
        points.append(ResumePoint(conversation_id, after_seq))
    if len({p.conversation_id for p in points}) != len(points):
        raise FrameError("invalid_frame", "resume: a conversation is listed twice")
    return Hello(token, tuple(points))


def _send(data: dict[str, Any], max_text_chars: int) -> Send:
    cid = data.get("cid")
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CID_CHARS:
        raise FrameError("invalid_frame", f"cid: required string of 1-{MAX_CID_CHARS} characters")
    conversation_id = data.get("conversation_id")
    if conversation_id is not None:
        conversation_id = _id(conversation_id, "conversation_id")
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise FrameError("invalid_frame", "text: required non-blank string")
    if len(text) > max_text_chars:
        raise FrameError("invalid_frame", f"text: longer than {max_text_chars} characters")
    return Send(cid, conversation_id, text)


def _id(value: object, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise FrameError("invalid_frame", f"{name}: required string of 1-{MAX_ID_CHARS} characters")
    return value


def message_id_for(tenant: str, subject: str, cid: str) -> str:
    """The stored id of a visitor's message: the same `cid` from the same visitor is one message.

    The conversation is left out on purpose: the first `send` of a conversation has no
    conversation id yet, and its retry (after a drop, now naming the conversation) must
    map to the same message.
    """
    return hashlib.sha256(f"{tenant}\x00{subject}\x00{cid}".encode()).hexdigest()[:32]


def event_frame(conversation_id: str, message: session_pb2.Message, owner: str) -> dict[str, Any]:
    """A stored event of the conversation log as a frame: `msg`, `state` or `note` (without `cid`).

    Notes are for agents only; whoever sends frames to a visitor must leave them out (the
    session service never gives a visitor principal a note in the first place)."""
    base = {"conversation_id": conversation_id, "seq": message.seq, "ts": message.created_at}
    if message.kind == "state":
        state = message.state
        frame: dict[str, Any] = {"type": "state", **base, "status": state.status, "version": state.version,
                                 "reason": state.reason}
        if state.assignee:
            frame["assignee"] = state.assignee
            frame["assignee_name"] = state.assignee_name or state.assignee
        return frame
    sender_type = SENDER_TYPES.get(message.role, "system")
    if sender_type == "visitor":
        sender: dict[str, str] = {"type": "visitor", "id": message.sender_id or owner}
    elif sender_type == "agent":
        sender = {"type": "agent", "id": message.sender_id}
        if message.sender_name:
            sender["name"] = message.sender_name
    else:
        sender = {"type": sender_type, "id": sender_type}
    return {"type": "note" if message.kind == "note" else "msg", **base, "message_id": message.id,
            "sender": sender, "text": message.content}


msg_frame = event_frame


def error_frame(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def nack_frame(kind: str, code: str, message: str, *, cid: str | None = None,
               conversation_id: str | None = None) -> dict[str, Any]:
    """A refused request. DESIGN.md names the refused request's type `type`, which is also the
    field every frame names itself by; the request's type goes in `request_type` instead."""
    frame: dict[str, Any] = {"type": "nack", "request_type": kind}
    if cid is not None:
        frame["cid"] = cid
    if conversation_id is not None:
        frame["conversation_id"] = conversation_id
    frame.update(code=code, message=message)
    return frame
