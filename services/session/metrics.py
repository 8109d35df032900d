"""Prometheus metrics of the session service, on a registry it owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram


@dataclass
class SessionMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.operation_seconds = Histogram(
            "kefu_session_operation_duration_seconds", "Time of a session operation, NATS round trips included.",
            ["operation"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.sessions_created = Counter(
            "kefu_sessions_created_total", "Sessions created.", registry=self.registry)
        # Counted from the server's MaxAge markers by one durable consumer shared by all
        # replicas: sum over replicas. Deleted sessions are not expiries.
        self.sessions_expired = Counter(
            "kefu_sessions_expired_total", "Sessions whose metadata expired after the idle TTL.",
            registry=self.registry)
        self.messages_appended = Counter(
            "kefu_session_messages_appended_total", "Messages stored, by role.", ["role"], registry=self.registry)
        self.context_tokens = Histogram(
            "kefu_session_context_tokens", "Tokens in a built context, by encoding.", ["encoding"],
            registry=self.registry,
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768))
