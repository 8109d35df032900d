"""Settings of the session service, read once from `KEFU_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

from services.common.settings import SettingsError, env_float, env_int, env_str, internal_token, nats_url
from services.session.tokens import ENCODINGS, canonical_encoding


# No slots: from_env reads the defaults off the class attributes.
@dataclass(frozen=True)
class SessionSettings:
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    """Port of the gRPC server; 0 picks a free one (tests)."""
    metrics_port: int = 9101
    nats_url: str = field(default="nats://127.0.0.1:4222", repr=False)
    """May carry the process's NATS user and password: never printed."""
    nats_replicas: int = 1
    """JetStream replicas of the session bucket and stream (3 on a 3-node NATS cluster)."""
    internal_token: str = field(default="", repr=False)
    """KEFU_INTERNAL_TOKEN: callers must send it (services.common.grpc_client); "" serves anyone."""
    max_history_messages: int = 200
    """Messages kept per session; the oldest are dropped first."""
    max_message_chars: int = 32_000
    session_ttl_s: float = 7 * 24 * 3600
    """A session nobody wrote to for this long expires."""
    default_context_tokens: int = 3000
    encoding: str = "cl100k_base"
    """Encoding of stored token counts and of contexts for an empty or unknown model.

    cl100k counts more tokens than newer tokenizers for Chinese (1.09 vs o200k's 0.74 a
    character), so an unknown model's context errs on the short side."""
    handoff_wait_s: float = 120.0
    """A conversation waiting for an agent longer than this goes back to the AI, with a leave-a-message reply."""
    idle_close_s: float = 600.0
    """An open conversation with no stored event for this long is closed."""
    closed_retention_s: float = 0.0
    """KEFU_CLOSED_RETENTION_S: a closed conversation (messages, metadata, index entries) is purged this long
    after it closed; 0: KEFU_SESSION_TTL_S, which bounds every stored record anyway."""
    grace_s: float = 10.0
    log_level: str = "INFO"
    visitor_msg_rps: float = 1.0
    """KEFU_VISITOR_MSG_RPS / _BURST: messages a visitor may store, over all its sockets, edges and /v1/chat."""
    visitor_msg_burst: int = 10
    visitor_max_conversations: int = 5
    """KEFU_VISITOR_MAX_CONVERSATIONS: open conversations one visitor may have; a new one beyond is refused."""
    tenant_max_stored_bytes: int = 1 << 30
    """KEFU_TENANT_MAX_STORED_BYTES: bytes of messages one tenant may store within the log's max age."""
    answer_lease_s: float = 15.0
    """KEFU_ANSWER_LEASE_S: an edge that stored a visitor message has this long (renewed while it streams)
    to answer it; after that another edge answers it on the visitor's resume or resend."""
    messages_max_bytes: int = 8 << 30
    """KEFU_MESSAGES_MAX_BYTES: size of the conversation log (stream KEFU_MESSAGES); when full it refuses
    new messages instead of dropping old ones."""

    def __post_init__(self) -> None:
        if not 0 < self.max_history_messages <= 10_000:
            raise SettingsError(f"KEFU_MAX_HISTORY_MESSAGES must be 1..10000, got {self.max_history_messages}")
        if self.session_ttl_s < 60:
            raise SettingsError(f"KEFU_SESSION_TTL_S must be at least 60, got {self.session_ttl_s}")
        if self.handoff_wait_s <= 0:
            raise SettingsError(f"KEFU_HANDOFF_WAIT_S must be positive, got {self.handoff_wait_s}")
        if self.idle_close_s <= 0:
            raise SettingsError(f"KEFU_IDLE_CLOSE_S must be positive, got {self.idle_close_s}")
        if self.closed_retention_s and not 60 <= self.closed_retention_s <= self.session_ttl_s:
            raise SettingsError(f"KEFU_CLOSED_RETENTION_S must be 0 or 60..KEFU_SESSION_TTL_S "
                                f"({self.session_ttl_s:g}), got {self.closed_retention_s:g}")
        if not 0 < self.visitor_msg_rps <= 1000 or not 1 <= self.visitor_msg_burst <= 100_000:
            raise SettingsError("KEFU_VISITOR_MSG_RPS must be in (0, 1000] and KEFU_VISITOR_MSG_BURST 1..100000, "
                                f"got {self.visitor_msg_rps} and {self.visitor_msg_burst}")
        if not 1 <= self.visitor_max_conversations <= 1000:
            raise SettingsError(f"KEFU_VISITOR_MAX_CONVERSATIONS must be 1..1000, got {self.visitor_max_conversations}")
        if self.tenant_max_stored_bytes < 4096 or self.tenant_max_stored_bytes * 2 > self.messages_max_bytes:
            # One tenant at its quota must leave the others most of the log (issue 17).
            raise SettingsError(f"KEFU_TENANT_MAX_STORED_BYTES must be at least 4096 and at most half of "
                                f"KEFU_MESSAGES_MAX_BYTES ({self.messages_max_bytes}), "
                                f"got {self.tenant_max_stored_bytes}")
        if not 1 <= self.answer_lease_s <= 300:
            raise SettingsError(f"KEFU_ANSWER_LEASE_S must be 1..300, got {self.answer_lease_s}")
        try:
            canonical_encoding(self.encoding)
        except ValueError:
            raise SettingsError(
                f"KEFU_TOKEN_ENCODING must be one of {list(ENCODINGS)}, got {self.encoding!r}") from None

    @property
    def retention_s(self) -> float:
        """How long a closed conversation is kept."""
        return self.closed_retention_s or self.session_ttl_s

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Self:
        return cls(
            host=env_str(env, "KEFU_BIND_HOST", cls.host),
            grpc_port=env_int(env, "KEFU_SESSION_PORT", cls.grpc_port, minimum=0, maximum=65535),
            metrics_port=env_int(env, "KEFU_SESSION_METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            nats_url=nats_url(env),
            nats_replicas=env_int(env, "KEFU_NATS_REPLICAS", cls.nats_replicas, minimum=1, maximum=5),
            internal_token=internal_token(env),
            max_history_messages=env_int(env, "KEFU_MAX_HISTORY_MESSAGES", cls.max_history_messages),
            max_message_chars=env_int(env, "KEFU_MAX_MESSAGE_CHARS", cls.max_message_chars, minimum=1),
            session_ttl_s=env_float(env, "KEFU_SESSION_TTL_S", cls.session_ttl_s),
            default_context_tokens=env_int(env, "KEFU_CONTEXT_MAX_TOKENS", cls.default_context_tokens, minimum=16),
            encoding=env_str(env, "KEFU_TOKEN_ENCODING", cls.encoding),
            handoff_wait_s=env_float(env, "KEFU_HANDOFF_WAIT_S", cls.handoff_wait_s),
            idle_close_s=env_float(env, "KEFU_IDLE_CLOSE_S", cls.idle_close_s),
            closed_retention_s=env_float(env, "KEFU_CLOSED_RETENTION_S", cls.closed_retention_s),
            grace_s=env_float(env, "KEFU_SHUTDOWN_GRACE_S", cls.grace_s, minimum=0),
            log_level=env_str(env, "KEFU_LOG_LEVEL", cls.log_level),
            visitor_msg_rps=env_float(env, "KEFU_VISITOR_MSG_RPS", cls.visitor_msg_rps),
            visitor_msg_burst=env_int(env, "KEFU_VISITOR_MSG_BURST", cls.visitor_msg_burst),
            visitor_max_conversations=env_int(env, "KEFU_VISITOR_MAX_CONVERSATIONS", cls.visitor_max_conversations),
            tenant_max_stored_bytes=env_int(env, "KEFU_TENANT_MAX_STORED_BYTES", cls.tenant_max_stored_bytes),
            messages_max_bytes=env_int(env, "KEFU_MESSAGES_MAX_BYTES", cls.messages_max_bytes),
            answer_lease_s=env_float(env, "KEFU_ANSWER_LEASE_S", cls.answer_lease_s),
        )
