"""Prometheus metrics of the session service, on a registry it owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.messages_refused = Counter(
            "kefu_session_messages_refused_total", "Messages refused by a limit (issue 17): rate_limited, "
            "quota_exceeded or storage_full.", ["limit"], registry=self.registry)
        self.answer_claims = Counter(
            "kefu_session_answer_claims_total", "Claims on an answer the AI owes: granted (an edge died mid-answer, "
            "or renews), held (another edge answers) or none (nothing owed).", ["result"], registry=self.registry)
        self.messages_appended = Counter(
            "kefu_session_messages_appended_total", "Messages stored, by role.", ["role"], registry=self.registry)
        self.context_tokens = Histogram(
            "kefu_session_context_tokens", "Tokens in a built context, by encoding.", ["encoding"],
            registry=self.registry,
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768))
        self.handoffs = Counter(
            "kefu_handoffs", "Conversations handed to the human queue (ai -> waiting_human), by trigger.",
            ["trigger"], registry=self.registry)
        self.queue_wait_seconds = Histogram(
            "kefu_queue_wait_seconds", "Time a conversation waited in the queue until an agent claimed it.",
            registry=self.registry, buckets=(1, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 1800))
        # The timers wait in nats-server (KEFU_TIMERS); these count only the ones that came due, and the
        # conversations they read: both stay flat while conversations sit open (no polling, issue 19).
        self.timers = Counter(
            "kefu_session_timers", "Due timers handled, by timer (wait, idle, purge) and result (acted, "
            "rearmed, skipped, gone, failed).", ["timer", "result"], registry=self.registry)
        self.timer_reads = Counter(
            "kefu_session_timer_reads", "Conversations the timers read: one per due timer, none while none is due.",
            registry=self.registry)
        # Every replica reads the same index: take one replica's value (max), never the sum.
        self.conversations = Gauge(
            "kefu_conversations", "Conversations by status over every tenant, from the conversation index.",
            ["status"], registry=self.registry)
