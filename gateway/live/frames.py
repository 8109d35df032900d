"""WebSocket frames of live chat: client frames parsed and checked, server frames built (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kefu.session.v1 import session_pb2

MAX_FRAME_BYTES = 65536
"""The contract: at most 64 KiB a frame; aiohttp closes a larger one with 1009."""
MAX_CID_CHARS = 64
MAX_ID_CHARS = 128
MAX_RESUME = 32
"""Conversations one `hello` may resume."""
MAX_SEQ = 2**63 - 1

# Close codes (docs/api.md "Close codes").
CLOSE_AUTH_FAILED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_RATE_LIMITED = 4008
CLOSE_BAD_FRAMES = 4400
CLOSE_TOO_BIG = 1009
CLOSE_DRAINING = 1012
CLOSE_TOO_SLOW = 1013

CLIENT_TYPES = frozenset({"hello", "send", "typing", "read", "handoff", "ping",
                          "claim", "release", "transfer", "close", "note", "presence"})
"""Every client frame type: the contract's, plus `presence` (agents: online/away)."""
AGENT_TYPES = frozenset({"claim", "release", "transfer", "close", "note", "presence"})
"""Frames only agents and admins may send."""
MAX_REASON_CHARS = 200
MAX_AGENT_ID_CHARS = 256

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
class Typing:
    conversation_id: str
    on: bool


@dataclass(frozen=True, slots=True)
class Read:
    conversation_id: str
    up_to_seq: int


@dataclass(frozen=True, slots=True)
class Handoff:
    conversation_id: str
    reason: str
    cid: str | None


@dataclass(frozen=True, slots=True)
class Claim:
    conversation_id: str
    cid: str | None


@dataclass(frozen=True, slots=True)
class Release:
    conversation_id: str
    to: str
    """"ai" or "queue"."""
    cid: str | None


@dataclass(frozen=True, slots=True)
class Transfer:
    conversation_id: str
    agent: str
    cid: str | None


@dataclass(frozen=True, slots=True)
class Close:
    conversation_id: str
    cid: str | None


@dataclass(frozen=True, slots=True)
class Note:
    conversation_id: str
    cid: str
    text: str


@dataclass(frozen=True, slots=True)
class Presence:
    status: str
    """"online" or "away"."""


ClientFrame = Hello | Send | Ping | Typing | Read | Handoff | Claim | Release | Transfer | Close | Note | Presence
AgentFrame = Claim | Release | Transfer | Close | Note | Presence


def parse_frame(raw: str, *, max_text_chars: int) -> ClientFrame:
    """One client text frame -> a typed frame; FrameError names what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise FrameError("invalid_json", "frame is not JSON") from None
    if not isinstance(data, dict):
        raise FrameError("invalid_frame", "frame must be a JSON object")
    if "\\u" in raw and _has_lone_surrogate(data):
        # "\ud800" escapes decode to lone surrogates, which no UTF-8 (nor protobuf, nor a JWT check)
        # can encode: refused here, before they reach a session call and hang the socket (issue 17).
        raise FrameError("invalid_frame", "strings must be valid Unicode text (no lone surrogates)")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise FrameError("invalid_frame", "type: required string")
    if kind not in CLIENT_TYPES:
        raise FrameError("unknown_type", f"type: unknown frame type {kind[:40]!r}")
    match kind:
        case "hello":
            return _hello(data)
        case "send":
            return Send(_cid(data), _optional_id(data), _text(data, max_text_chars))
        case "ping":
            return Ping()
        case "typing":
            on = data.get("on", True)
            if not isinstance(on, bool):
                raise FrameError("invalid_frame", "on: must be true or false")
            return Typing(_id(data.get("conversation_id"), "conversation_id"), on)
        case "read":
            return Read(_id(data.get("conversation_id"), "conversation_id"), _seq(data.get("up_to_seq"), "up_to_seq"))
        case "handoff":
            return Handoff(_id(data.get("conversation_id"), "conversation_id"), _reason(data), _optional_cid(data))
        case "claim":
            return Claim(_id(data.get("conversation_id"), "conversation_id"), _optional_cid(data))
        case "release":
            to = data.get("to", "ai")
            if to not in ("ai", "queue"):
                raise FrameError("invalid_frame", "to: must be \"ai\" or \"queue\"")
            return Release(_id(data.get("conversation_id"), "conversation_id"), to, _optional_cid(data))
        case "transfer":
            agent = data.get("agent")
            if not isinstance(agent, str) or not 0 < len(agent) <= MAX_AGENT_ID_CHARS:
                raise FrameError("invalid_frame", f"agent: required string of 1-{MAX_AGENT_ID_CHARS} characters")
            return Transfer(_id(data.get("conversation_id"), "conversation_id"), agent, _optional_cid(data))
        case "close":
            return Close(_id(data.get("conversation_id"), "conversation_id"), _optional_cid(data))
        case "note":
            return Note(_id(data.get("conversation_id"), "conversation_id"), _cid(data),
                        _text(data, max_text_chars))
        case _:
            status = data.get("status")
            if status not in ("online", "away"):
                raise FrameError("invalid_frame", "status: must be \"online\" or \"away\"")
            return Presence(status)


def _has_lone_surrogate(data: dict[str, Any]) -> bool:
    """Only escapes can make one (the frame itself is UTF-8), so callers look for `\\u` first."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
        points.append(ResumePoint(conversation_id, _seq(item.get("after_seq", 0), f"resume[{index}].after_seq")))
    if len({p.conversation_id for p in points}) != len(points):
        raise FrameError("invalid_frame", "resume: a conversation is listed twice")
    return Hello(token, tuple(points))


def _cid(data: dict[str, Any]) -> str:
    cid = data.get("cid")
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CID_CHARS:
        raise FrameError("invalid_frame", f"cid: required string of 1-{MAX_CID_CHARS} characters")
    return cid


def _optional_cid(data: dict[str, Any]) -> str | None:
    return _cid(data) if data.get("cid") is not None else None


def _optional_id(data: dict[str, Any]) -> str | None:
    value = data.get("conversation_id")
    return _id(value, "conversation_id") if value is not None else None


def _text(data: dict[str, Any], max_text_chars: int) -> str:
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise FrameError("invalid_frame", "text: required non-blank string")
    if len(text) > max_text_chars:
        raise FrameError("invalid_frame", f"text: longer than {max_text_chars} characters")
    return text


def _reason(data: dict[str, Any]) -> str:
    reason = data.get("reason", "")
    if reason is None:
        return ""
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise FrameError("invalid_frame", f"reason: must be a string of at most {MAX_REASON_CHARS} characters")
    return reason


def _seq(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise FrameError("invalid_frame", f"{name}: must be an integer >= 0")
    return value


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
    frame = {"type": "note" if message.kind == "note" else "msg", **base, "message_id": message.id,
             "sender": sender, "text": message.content}
    if sender_type == "ai":
        frame["citations"] = citations_json(message.citations)
    return frame


def citations_json(citations: Iterable[session_pb2.Citation]) -> list[dict[str, str]]:
    """The sources an AI reply cites, as the `msg` frame and the history endpoints give them."""
    return [{"document_id": c.document_id, "title": c.title, "url": c.url, "chunk_id": c.chunk_id,
             "quote": c.quote} for c in citations]



def error_frame(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def nack_frame(kind: str, code: str, message: str, *, cid: str | None = None,
               conversation_id: str | None = None) -> dict[str, Any]:
    """A refused request. Its type cannot go in `type`, which is also the
    field every frame names itself by; the request's type goes in `request_type` instead."""
    frame: dict[str, Any] = {"type": "nack", "request_type": kind}
    if cid is not None:
        frame["cid"] = cid
    if conversation_id is not None:
        frame["conversation_id"] = conversation_id
    frame.update(code=code, message=message)
    return frame
