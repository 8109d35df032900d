"""Settings of the session service, read once from `KEFU_*` variables (services.common.settings.KefuSettings)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, field_validator, model_validator

from services.common.settings import KefuSettings, SettingsError
from services.session.tokens import ENCODINGS, canonical_encoding


class SessionSettings(KefuSettings):
    host: str = Field("127.0.0.1", validation_alias="KEFU_BIND_HOST")
    grpc_port: int = Field(50051, ge=0, le=65535, validation_alias="KEFU_SESSION_PORT")
    """Port of the gRPC server; 0 picks a free one (tests)."""
    metrics_port: int = Field(9101, ge=0, le=65535, validation_alias="KEFU_SESSION_METRICS_PORT")
    nats_url: str = Field("nats://127.0.0.1:4222", repr=False)
    """May carry the process's NATS user and password: never printed."""
    nats_replicas: int = Field(1, ge=1, le=5)
    """JetStream replicas of the session bucket and stream (3 on a 3-node NATS cluster)."""
    internal_token: str = Field("", repr=False)
    """KEFU_INTERNAL_TOKEN: callers must send it (services.common.grpc_client); "" serves anyone."""
    max_history_messages: int = Field(200, ge=1, le=10_000)
    """Messages kept per session; the oldest are dropped first."""
    max_message_chars: int = Field(32_000, ge=1)
    session_ttl_s: float = Field(7 * 24 * 3600, ge=60)
    """A session nobody wrote to for this long expires."""
    default_context_tokens: int = Field(3000, ge=16, validation_alias="KEFU_CONTEXT_MAX_TOKENS")
    encoding: str = Field("cl100k_base", validation_alias="KEFU_TOKEN_ENCODING")
    """Encoding of stored token counts and of contexts for an empty or unknown model.

    cl100k counts more tokens than newer tokenizers for Chinese (1.09 vs o200k's 0.74 a
    character), so an unknown model's context errs on the short side."""
    handoff_wait_s: float = Field(120.0, gt=0)
    """A conversation waiting for an agent longer than this goes back to the AI, with a leave-a-message reply."""
    idle_close_s: float = Field(600.0, gt=0)
    """An open conversation with no stored event for this long is closed."""
    closed_retention_s: float = 0.0
    """KEFU_CLOSED_RETENTION_S: a closed conversation (messages, metadata, index entries) is purged this long
    after it closed; 0: KEFU_SESSION_TTL_S, which bounds every stored record anyway."""
    grace_s: float = Field(10.0, ge=0, validation_alias="KEFU_SHUTDOWN_GRACE_S")
    log_level: str = "INFO"
    visitor_msg_rps: float = Field(1.0, gt=0, le=1000)
    """KEFU_VISITOR_MSG_RPS / _BURST: messages a visitor may store, over all its sockets, edges and /v1/chat."""
    visitor_msg_burst: int = Field(10, ge=1, le=100_000)
    visitor_max_conversations: int = Field(5, ge=1, le=1000)
    """KEFU_VISITOR_MAX_CONVERSATIONS: open conversations one visitor may have; a new one beyond is refused."""
    tenant_max_stored_bytes: int = Field(1 << 30, ge=4096)
    """KEFU_TENANT_MAX_STORED_BYTES: bytes of messages one tenant may store within the log's max age."""
    answer_lease_s: float = Field(15.0, ge=1, le=300)
    """KEFU_ANSWER_LEASE_S: an edge that stored a visitor message has this long (renewed while it streams)
    to answer it; after that another edge answers it on the visitor's resume or resend."""
    messages_max_bytes: int = 8 << 30
    """KEFU_MESSAGES_MAX_BYTES: size of the conversation log (stream KEFU_MESSAGES); when full it refuses
    new messages instead of dropping old ones."""

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        try:
            canonical_encoding(encoding)
        except ValueError:
            raise SettingsError(f"KEFU_TOKEN_ENCODING must be one of {list(ENCODINGS)}, got {encoding!r}") from None
        return encoding

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.closed_retention_s and not 60 <= self.closed_retention_s <= self.session_ttl_s:
            raise SettingsError(f"KEFU_CLOSED_RETENTION_S must be 0 or 60..KEFU_SESSION_TTL_S "
                                f"({self.session_ttl_s:g}), got {self.closed_retention_s:g}")
        if self.tenant_max_stored_bytes * 2 > self.messages_max_bytes:
            # One tenant at its quota must leave the others most of the log (issue 17).
            raise SettingsError(f"KEFU_TENANT_MAX_STORED_BYTES must be at least 4096 and at most half of "
                                f"KEFU_MESSAGES_MAX_BYTES ({self.messages_max_bytes}), "
                                f"got {self.tenant_max_stored_bytes}")
        return self

    @property
    def retention_s(self) -> float:
        """How long a closed conversation is kept."""
        return self.closed_retention_s or self.session_ttl_s
