"""The session service's domain records and their JSON form in NATS."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Self

from services.common.errors import InvalidArgument

ROLES = frozenset({"user", "assistant", "agent", "system"})
KINDS = frozenset({"message", "state", "note"})
"""`message` is said to someone; `state` records a status change; `note` is staff-only."""
STATUSES = ("ai", "waiting_human", "human", "closed")
OPEN_STATUSES = ("ai", "waiting_human", "human")
PREVIEW_CHARS = 120
PRINCIPAL_ROLES = frozenset({"visitor", "agent", "admin"})
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SESSION_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MESSAGE_ID_PATTERN = SESSION_ID_PATTERN


def new_id() -> str:
    """128 random bits: session and message ids are unguessable."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    subject: str
    role: str

    def __post_init__(self) -> None:
        if not TENANT_PATTERN.fullmatch(self.tenant):
            raise InvalidArgument("tenant must be 1-64 letters, digits, '_' or '-'")
        if not self.subject or len(self.subject) > 256:
            raise InvalidArgument("subject must be 1-256 characters")
        if self.role not in PRINCIPAL_ROLES:
            raise InvalidArgument(f"role must be one of {sorted(PRINCIPAL_ROLES)}")

    @property
    def is_staff(self) -> bool:
        return self.role in ("agent", "admin")


@dataclass(frozen=True, slots=True)
class ConversationState:
    """Where a conversation stands; every change bumps `version` by compare-and-set on the meta key."""

    status: str = "ai"
    version: int = 1
    assignee: str = ""
    """JWT `sub` of the agent holding it (status "human"), else empty."""
    assignee_name: str = ""
    reason: str = "created"
    since: float = 0.0
    """When the conversation entered `status` (Unix seconds)."""

    def to_dict(self) -> dict[str, object]:
        # By name, not asdict (a recursive copy): written with every metadata write (issue 20).
        return {"status": self.status, "version": self.version, "assignee": self.assignee,
                "assignee_name": self.assignee_name, "reason": self.reason, "since": self.since}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        return cls(status=str(raw["status"]), version=int(raw["version"]),
                   assignee=str(raw.get("assignee", "")), assignee_name=str(raw.get("assignee_name", "")),
                   reason=str(raw.get("reason", "")), since=float(raw.get("since", 0.0)))


MAX_CITATIONS = 20
CITATION_FIELDS = ("document_id", "title", "url", "chunk_id", "quote")
MAX_CITATION_FIELD_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Citation:
    """A source an AI reply quoted (one of the tenant's documents)."""

    document_id: str
    title: str = ""
    url: str = ""
    chunk_id: str = ""
    quote: str = ""

    def __post_init__(self) -> None:
        if not self.document_id:
            raise InvalidArgument("a citation needs a document_id")
        if any(len(getattr(self, name)) > MAX_CITATION_FIELD_CHARS for name in CITATION_FIELDS):
            raise InvalidArgument(f"citation fields are at most {MAX_CITATION_FIELD_CHARS} characters")

    def to_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in CITATION_FIELDS}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        return cls(**{name: str(raw.get(name, "")) for name in CITATION_FIELDS})


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: str
    role: str
    content: str
    created_at: float
    tokens: int
    seq: int = 0
    """JetStream sequence of the message: the order of acknowledgement. Not stored, assigned."""
    encoding: str = ""
    """Encoding `tokens` was counted with; context building recounts for another one."""
    kind: str = "message"
    sender_id: str = ""
    """JWT `sub` of the visitor or agent who wrote it; empty for the AI and the system."""
    sender_name: str = ""
    state: ConversationState | None = None
    """For kind "state": the conversation's state after the change."""
    version: int = 0
    """For a conditional append (AI replies): the state version it was generated under."""
    citations: tuple[Citation, ...] = ()
    """The sources an AI reply cites."""

    @classmethod
    def system(cls, content: str, tokens: int, encoding: str) -> Self:
        return cls(id="", role="system", content=content, created_at=time.time(), tokens=tokens,
                   encoding=encoding)

    def to_json(self) -> bytes:
        raw: dict[str, object] = {"id": self.id, "role": self.role, "content": self.content,
                                  "created_at": self.created_at, "tokens": self.tokens, "encoding": self.encoding}
        # Optional fields only when set: messages stay as small as before the live chat.
        if self.kind != "message":
            raw["kind"] = self.kind
        if self.sender_id:
            raw["sender_id"] = self.sender_id
        if self.sender_name:
            raw["sender_name"] = self.sender_name
        if self.state is not None:
            raw["state"] = self.state.to_dict()
        if self.version:
            raw["version"] = self.version
        if self.citations:
            raw["citations"] = [c.to_dict() for c in self.citations]
        return json.dumps(raw, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, seq: int) -> Self:
        raw = json.loads(data)
        state = raw.get("state")
        # Messages stored before `encoding` existed have an unknown count: recounted on use.
        return cls(id=raw["id"], role=raw["role"], content=raw["content"],
                   created_at=float(raw["created_at"]), tokens=int(raw["tokens"]), seq=seq,
                   encoding=str(raw.get("encoding", "")), kind=str(raw.get("kind", "message")),
                   sender_id=str(raw.get("sender_id", "")), sender_name=str(raw.get("sender_name", "")),
                   state=ConversationState.from_dict(state) if state else None,
                   version=int(raw.get("version", 0)),
                   citations=tuple(Citation.from_dict(c) for c in raw.get("citations", ())))


@dataclass(slots=True)
class MetaDelta:
    """Counters of stored messages not yet added to the session's metadata (one batch)."""

    messages: int = 0
    user_messages: int = 0
    tokens: int = 0
    updated_at: float = 0.0
    preview: str = ""
    preview_seq: int = 0
    owed: str = ""
    """Id of the newest visitor message of the batch, or "" when something answered after it."""
    owed_seq: int = 0
    """Seq of the newest message that decides `owed` (0: none in the batch)."""
    owed_at: float = 0.0
    """When that message was stored: the lease of an owed answer runs from then, however late it is written."""

    def add(self, message: StoredMessage) -> None:
        self.messages += 1
        self.user_messages += message.role == "user" and message.kind == "message"
        self.tokens += message.tokens
        self.updated_at = max(self.updated_at, message.created_at)
        if message.role == "user" and message.kind == "message" and message.seq > self.preview_seq:
            self.preview, self.preview_seq = message.content[:PREVIEW_CHARS], message.seq
        if message.kind != "note" and message.seq > self.owed_seq:
            # A visitor's message is owed an answer; anything said after it (AI, agent, system) pays it.
            self.owed = message.id if message.role == "user" and message.kind == "message" else ""
            self.owed_seq, self.owed_at = message.seq, message.created_at

    def merge(self, other: MetaDelta) -> None:
        """Add another batch's counters (the newest preview and owed message win, by seq)."""
        self.messages += other.messages
        self.user_messages += other.user_messages
        self.tokens += other.tokens
        self.updated_at = max(self.updated_at, other.updated_at)
        if other.preview_seq > self.preview_seq:
            self.preview, self.preview_seq = other.preview, other.preview_seq
        if other.owed_seq > self.owed_seq:
            self.owed, self.owed_seq, self.owed_at = other.owed, other.owed_seq, other.owed_at


@dataclass(frozen=True, slots=True)
class AnswerOwed:
    """A visitor message without its answer yet, and who may answer it until when."""

    message_id: str
    seq: int
    holder: str
    """"" : the edge whose turn stored the message; else the id of the edge that claimed it."""
    until: float
    """Unix seconds: after this anyone may claim it (its holder is presumed dead)."""


@dataclass(frozen=True, slots=True)
class SessionMeta:
    tenant: str
    owner: str
    """JWT `sub` of the visitor who created the session."""
    created_at: float
    updated_at: float
    """Time of the newest message (Unix seconds)."""
    message_count: int = 0
    """Messages ever appended, including those the history bound has dropped since."""
    user_message_count: int = 0
    token_count: int = 0
    """Tokens of all appended messages, in the store's encoding."""
    state: ConversationState = field(default_factory=ConversationState)
    preview: str = ""
    """The start of the visitor's newest message (agents' lists)."""
    preview_seq: int = 0
    """Sequence of the message `preview` comes from: an older batch never overwrites a newer one."""
    owed: AnswerOwed | None = None
    """The visitor message the AI owes an answer to, while in status "ai" (issue 17 item 7)."""

    def with_delta(self, delta: MetaDelta, answer_lease_s: float = 0.0) -> Self:
        """Counters plus `delta`; a visitor message owed an answer gets a lease of `answer_lease_s` for the
        edge whose turn stored it (0: nobody tracks answers)."""
        newer_preview = delta.preview_seq > self.preview_seq
        owed = self.owed
        if answer_lease_s and delta.owed_seq > (owed.seq if owed is not None else 0):
            owed = (AnswerOwed(delta.owed, delta.owed_seq, "", (delta.owed_at or time.time()) + answer_lease_s)
                    if delta.owed and self.state.status == "ai" else None)
        return replace(
            self, updated_at=max(self.updated_at, delta.updated_at),
            message_count=self.message_count + delta.messages,
            user_message_count=self.user_message_count + delta.user_messages,
            token_count=self.token_count + delta.tokens,
            preview=delta.preview if newer_preview else self.preview,
            preview_seq=delta.preview_seq if newer_preview else self.preview_seq,
            owed=owed,
        )

    def to_json(self) -> bytes:
        # By name, not asdict (a recursive copy that was 3 % of the session's CPU under load, issue 20);
        # tests/session/test_models_json.py fails when a field is left out here.
        raw: dict[str, object] = {
            "tenant": self.tenant, "owner": self.owner, "created_at": self.created_at, "updated_at": self.updated_at,
            "message_count": self.message_count, "user_message_count": self.user_message_count,
            "token_count": self.token_count, "state": self.state.to_dict(), "preview": self.preview,
            "preview_seq": self.preview_seq}
        if self.owed is not None:  # most of the time not: records stay as they were before
            raw["owed"] = {"message_id": self.owed.message_id, "seq": self.owed.seq, "holder": self.owed.holder,
                           "until": self.owed.until}
        return json.dumps(raw, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        raw = json.loads(data)
        owed = raw.pop("owed", None)
        raw["owed"] = AnswerOwed(**owed) if owed else None
        state = raw.pop("state", None)
        # Sessions stored before the live chat have no state: they read as a new one, in "ai".
        raw["state"] = (ConversationState.from_dict(state) if state
                        else ConversationState(since=float(raw["created_at"])))
        return cls(**raw)
