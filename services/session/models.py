"""The session service's domain records and their JSON form in NATS."""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, replace
from typing import Self

from services.common.errors import InvalidArgument

ROLES = frozenset({"user", "assistant", "agent", "system"})
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

    @classmethod
    def system(cls, content: str, tokens: int, encoding: str) -> Self:
        return cls(id="", role="system", content=content, created_at=time.time(), tokens=tokens,
                   encoding=encoding)

    def to_json(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "seq"}, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, seq: int) -> Self:
        raw = json.loads(data)
        # Messages stored before `encoding` existed have an unknown count: recounted on use.
        return cls(id=raw["id"], role=raw["role"], content=raw["content"],
                   created_at=float(raw["created_at"]), tokens=int(raw["tokens"]), seq=seq,
                   encoding=str(raw.get("encoding", "")))


@dataclass(slots=True)
class MetaDelta:
    """Counters of stored messages not yet added to the session's metadata (one batch)."""

    messages: int = 0
    user_messages: int = 0
    tokens: int = 0
    updated_at: float = 0.0

    def add(self, message: StoredMessage) -> None:
        self.messages += 1
        self.user_messages += message.role == "user"
        self.tokens += message.tokens
        self.updated_at = max(self.updated_at, message.created_at)


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

    def with_delta(self, delta: MetaDelta) -> Self:
        return replace(
            self, updated_at=max(self.updated_at, delta.updated_at),
            message_count=self.message_count + delta.messages,
            user_message_count=self.user_message_count + delta.user_messages,
            token_count=self.token_count + delta.tokens,
        )

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        return cls(**json.loads(data))
