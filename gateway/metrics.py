"""Prometheus metrics of the edge, on a registry the app owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class EdgeMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.request_seconds = Histogram(
            "kefu_http_request_duration_seconds", "Time to answer an HTTP request (streams: to the last event).",
            ["route", "status"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft_seconds = Histogram(
            "kefu_chat_time_to_first_delta_seconds", "Time from request to the first message event sent.",
            registry=self.registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30))
        self.active_streams = Gauge(
            "kefu_active_streams", "SSE answer streams open right now.", registry=self.registry)
        self.stream_errors = Counter(
            "kefu_stream_errors", "Streams ended by an error event, by code.", ["code"], registry=self.registry)
        self.rate_limited = Counter(
            "kefu_rate_limited", "Requests refused with 429, by scope.", ["scope"], registry=self.registry)
        self.ws_connections = Gauge(
            "kefu_ws_connections", "Live-chat WebSockets open on this edge, by role.", ["role"],
            registry=self.registry)
        self.ws_messages = Counter(
            "kefu_ws_messages_total", "Live-chat frames, by direction (in|out) and frame type.",
            ["direction", "type"], registry=self.registry)
        self.ws_silent_dropped = Counter(
            "kefu_ws_silent_dropped_total", "Live-chat WebSockets dropped for not answering a ping (a client gone "
            "without closing).", registry=self.registry)
        self.log_consumers = Gauge(
            "kefu_live_log_consumers", "Conversation logs this edge follows (through its one JetStream consumer).",
            registry=self.registry)
        self.log_consumer_restarts = Counter(
            "kefu_live_log_consumer_restarts_total", "Conversation-log consumers created again, by why: gap, "
            "reconnect, silent.", ["reason"], registry=self.registry)
        self.console_logins = Counter(
            "kefu_console_logins_total", "Console login attempts past the body check, by outcome: ok, invalid "
            "(wrong credentials), throttled (too many failures for the address or user name), busy (every "
            "verification slot taken).", ["outcome"], registry=self.registry)
        self.readiness_rounds = Counter(
            "kefu_readiness_checks", "Rounds of backend health checks behind /readyz (one gRPC check per backend "
            "each; at most about one a second, however often /readyz is asked).", registry=self.registry)
        self.resume_replayed = Histogram(
            "kefu_resume_replayed_events", "Stored events replayed to a socket that resumed a conversation.",
            registry=self.registry, buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        self.count_ws_frame_out = self._count_ws_frame_out
        """One bound method for every socket's Connection (a lambda each would cost an idle socket ~250 bytes)."""

    def _count_ws_frame_out(self, kind: str) -> None:
        self.ws_messages.labels("out", kind).inc()
