"""Settings of the edge, read once from `KEFU_*` variables."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from gateway.addresses import Network, parse_trusted_proxies
from services.common.settings import (
    SettingsError,
    check_secret,
    env_bool,
    env_float,
    env_int,
    env_str,
    internal_token,
    nats_url,
)

DEFAULT_SYSTEM_PROMPT = (
    "You are the customer-service assistant of an online shop. Answer politely and briefly, "
    "in the visitor's language. If you cannot help, offer to pass the visitor to a human agent."
)

MAX_OUTPUT_TOKENS = 32_768
"""The most output tokens any caller may ask for (OpenAI's max_tokens bound on /v1/chat/completions)."""


# No slots: from_env reads the defaults off the class attributes.
@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    http_port: int = 8080
    jwt_secret: str = ""
    jwt_public_key_file: Path | None = None
    jwt_jwks_file: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_s: float = 30.0
    max_body_bytes: int = 1024 * 1024
    max_message_chars: int = 8000
    rate_limit_rps: float = 1000.0
    rate_limit_burst: int = 2000
    tenant_rate_limit_rps: float = 5000.0
    route_rate_limits: Mapping[str, tuple[float, int]] = field(default_factory=dict)
    """Per-route principal buckets, e.g. KEFU_RATE_LIMIT_ROUTES="/v1/chat=20:40" (rps:burst)."""
    tenant_rate_limits: Mapping[str, float] = field(default_factory=dict)
    """Per-tenant rates, e.g. KEFU_TENANT_RATE_LIMITS="acme=200,beta=50"."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API ("*" for any); empty turns CORS off."""
    nats_url: str = "nats://127.0.0.1:4222"
    """KEFU_NATS_URL: live-chat fan-out between edge processes and the edge's shared state (KV); may carry
    KEFU_NATS_USER / KEFU_NATS_PASSWORD (services.common.settings.nats_url), so never printed."""
    internal_token: str = ""
    """KEFU_INTERNAL_TOKEN: sent on every call to the services (services.common.grpc_client); "" sends none."""
    session_addr: str = "127.0.0.1:50051"
    moderation_addr: str = "127.0.0.1:50052"
    worker_addr: str = "127.0.0.1:50053"
    model: str = ""
    """KEFU_MODEL: the default route's upstream model; picks the token encoding of its contexts."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    context_max_tokens: int = 3000
    max_output_tokens: int = 1024
    """KEFU_MAX_OUTPUT_TOKENS: most tokens of one answer to a visitor (a larger max_tokens is clamped)."""
    tenant_max_output_tokens: Mapping[str, int] = field(default_factory=dict)
    """KEFU_TENANT_MAX_OUTPUT_TOKENS: per-tenant caps over KEFU_MAX_OUTPUT_TOKENS, e.g. "acme=2048,beta=256"."""
    rpc_timeout_s: float = 5.0
    """Deadline of each unary gRPC call (moderation, session)."""
    stream_timeout_s: float = 300.0
    """Deadline of a whole answer stream."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long streams in flight may run before the edge closes them."""
    log_level: str = "INFO"
    ws_heartbeat_s: float = 30.0
    """KEFU_WS_HEARTBEAT_S: the edge pings each WebSocket this often; a peer that misses the pong is closed."""
    ws_send_queue: int = 256
    """KEFU_WS_SEND_QUEUE: frames queued for one socket; a client that lets it fill is closed (1013)."""
    widget_tenants: frozenset[str] = frozenset()
    """KEFU_WIDGET_TENANTS: tenants whose anonymous visitors may get a token at POST /v1/widget/token."""
    widget_token_rps: float = 1.0
    """KEFU_WIDGET_TOKEN_RPS: tokens per second per client address (also the console login's rate)."""
    widget_token_burst: int = 10
    """KEFU_WIDGET_TOKEN_BURST: tokens one client address may take at once (also the console login's)."""
    widget_token_ttl_s: int = 86400
    """KEFU_WIDGET_TOKEN_TTL_S: lifetime of a visitor token; renewable up to 30 days past its expiry."""
    console_token_ttl_s: int = 28800
    """KEFU_CONSOLE_TOKEN_TTL_S: lifetime of an agent token from POST /v1/console/login."""
    nats_replicas: int = 1
    """KEFU_NATS_REPLICAS: JetStream replicas of the buckets the edge creates (canned replies, blacklist...)."""
    ws_frame_rps: float = 20.0
    """KEFU_WS_FRAME_RPS / KEFU_WS_FRAME_BURST: frames a socket may send; faster closes it (4008)."""
    ws_frame_burst: int = 60
    visitor_max_sockets: int = 5
    """KEFU_VISITOR_MAX_SOCKETS: open WebSockets of one visitor on this edge process; one more is closed 4008."""
    visitor_max_conversations: int = 5
    """KEFU_VISITOR_MAX_CONVERSATIONS (as the session service): conversations a visitor's socket may follow."""
    answer_lease_s: float = 15.0
    """KEFU_ANSWER_LEASE_S (as the session service): a streaming answer renews its lease every third of it."""
    handoff_keywords: tuple[str, ...] = ("转人工", "人工客服", "人工服务", "找人工", "真人", "人工", "human", "agent",
                                         "real person", "live agent")
    """KEFU_HANDOFF_KEYWORDS (comma-separated): a short visitor message with one of these asks for a human."""
    desk_poll_s: float = 2.0
    """KEFU_DESK_POLL_S: how often an edge with agents re-reads its tenants' queues (changes also push)."""
    max_history_messages: int = 200
    kb_max_document_bytes: int = 10 * 1024 * 1024
    """KEFU_KB_MAX_DOCUMENT_BYTES (as the worker): an uploaded document over this is refused with 413."""
    trusted_proxies: tuple[Network, ...] = ()
    account_check_s: float = 10.0
    """KEFU_ACCOUNT_CHECK_S: how long the edge trusts its last look at an agent account (a disabled one's tokens
    stop working within this, and its open sockets are closed within twice this)."""
    """KEFU_TRUSTED_PROXIES: networks of the proxies in front of the edge, whose X-Forwarded-For is believed."""
    """KEFU_MAX_HISTORY_MESSAGES (as the session service): a resume from before the kept history is a resync."""
    login_max_concurrent: int = 2
    """KEFU_LOGIN_MAX_CONCURRENT: argon2 password verifications at once in this process (19 MiB each); more
    logins wait up to a second, then get 429."""
    login_max_per_s: float = 10.0
    """KEFU_LOGIN_MAX_PER_S: argon2 verifications a second in this process (burst as many); more get 429 at once."""
    login_address_failures: int = 20
    """KEFU_LOGIN_ADDRESS_FAILURES: failed console logins per client address per KEFU_LOGIN_FAILURE_WINDOW_S."""
    login_user_failures: int = 10
    """KEFU_LOGIN_USER_FAILURES: failed console logins per tenant and user name per KEFU_LOGIN_FAILURE_WINDOW_S."""
    login_failure_window_s: float = 600.0
    """KEFU_LOGIN_FAILURE_WINDOW_S: the failure buckets refill fully over this (one failure per window/N)."""
    visitor_max_lifetime_s: int = 90 * 86400
    """KEFU_VISITOR_MAX_LIFETIME_S: how long a chain of renewed visitor tokens may last from its first token."""
    metrics_port: int = 9110
    """KEFU_EDGE_METRICS_PORT: Prometheus /metrics of the edge, apart from the public port; each edge
    process on a machine takes the first free port from this one upwards (workers: 9110, 9111, ...;
    above the services' 9101-9103); 0 picks any free port."""
    metrics_on_http_port: bool = False
    """KEFU_METRICS_ON_HTTP_PORT: also serve /metrics on the public HTTP port (older scrape setups)."""
    conn_guard: bool = True
    """KEFU_CONN_GUARD: close connections at accept from an address over KEFU_CONN_RPS / KEFU_CONN_BURST new
    connections, or in a penalty window after KEFU_CONN_MAX_REFUSALS 429s in a row on one connection (the
    window starts at KEFU_CONN_PENALTY_S and doubles up to KEFU_CONN_MAX_PENALTY_S); never a trusted proxy."""
    conn_rps: float = 50.0
    conn_burst: int = 500
    conn_max_refusals: int = 20
    conn_penalty_s: float = 1.0
    conn_max_penalty_s: float = 60.0
    conn_max_addresses: int = 50_000
    """KEFU_CONN_MAX_ADDRESSES: addresses the connection guard remembers (least recently seen forgotten first)."""

    def __post_init__(self) -> None:
        check_secret("KEFU_JWT_SECRET", self.jwt_secret)
        if not self.jwt_secret and self.jwt_public_key_file is None and self.jwt_jwks_file is None:
            raise SettingsError("set KEFU_JWT_SECRET (HS256), KEFU_JWT_PUBLIC_KEY_FILE or KEFU_JWT_JWKS_FILE "
                                "(RS256/ES256)")
        for name, path in (("KEFU_JWT_PUBLIC_KEY_FILE", self.jwt_public_key_file),
                           ("KEFU_JWT_JWKS_FILE", self.jwt_jwks_file)):
            if path is not None and not path.is_file():
                raise SettingsError(f"{name}: no such file {path}")
        if not 1024 <= self.max_body_bytes <= 64 * 1024 * 1024:
            raise SettingsError(f"KEFU_MAX_BODY_BYTES must be 1024..67108864, got {self.max_body_bytes}")
        if self.conn_max_penalty_s < self.conn_penalty_s:
            raise SettingsError(f"KEFU_CONN_MAX_PENALTY_S ({self.conn_max_penalty_s:g}) must be at least "
                                f"KEFU_CONN_PENALTY_S ({self.conn_penalty_s:g})")
        for tenant in self.widget_tenants:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tenant):
                raise SettingsError(f"KEFU_WIDGET_TENANTS: {tenant!r} is not a tenant name (1-64 letters, digits, "
                                    "'_' or '-')")

    def output_cap(self, tenant: str) -> int:
        """Most tokens one answer to a visitor of `tenant` may have."""
        return self.tenant_max_output_tokens.get(tenant, self.max_output_tokens)

    def __repr__(self) -> str:
        return f"GatewaySettings(http_port={self.http_port}, session={self.session_addr}, " \
               f"moderation={self.moderation_addr}, worker={self.worker_addr})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Self:
        key_file = env_str(env, "KEFU_JWT_PUBLIC_KEY_FILE", "")
        jwks_file = env_str(env, "KEFU_JWT_JWKS_FILE", "")
        return cls(
            host=env_str(env, "KEFU_BIND_HOST", cls.host),
            http_port=env_int(env, "KEFU_HTTP_PORT", cls.http_port, minimum=0, maximum=65535),
            jwt_secret=env.get("KEFU_JWT_SECRET", ""),
            jwt_public_key_file=Path(key_file) if key_file else None,
            jwt_jwks_file=Path(jwks_file) if jwks_file else None,
            jwt_issuer=env_str(env, "KEFU_JWT_ISSUER", ""),
            jwt_audience=env_str(env, "KEFU_JWT_AUDIENCE", ""),
            jwt_leeway_s=env_float(env, "KEFU_JWT_LEEWAY_S", cls.jwt_leeway_s, minimum=0),
            max_body_bytes=env_int(env, "KEFU_MAX_BODY_BYTES", cls.max_body_bytes),
            max_message_chars=env_int(env, "KEFU_MAX_MESSAGE_CHARS", cls.max_message_chars, minimum=1),
            rate_limit_rps=env_float(env, "KEFU_RATE_LIMIT_RPS", cls.rate_limit_rps, minimum=0.001),
            rate_limit_burst=env_int(env, "KEFU_RATE_LIMIT_BURST", cls.rate_limit_burst, minimum=1),
            tenant_rate_limit_rps=env_float(env, "KEFU_TENANT_RATE_LIMIT_RPS", cls.tenant_rate_limit_rps,
                                            minimum=0.001),
            route_rate_limits=parse_route_limits(env.get("KEFU_RATE_LIMIT_ROUTES", "")),
            tenant_rate_limits=parse_tenant_limits(env.get("KEFU_TENANT_RATE_LIMITS", "")),
            cors_origins=tuple(o.strip().rstrip("/") for o in env.get("KEFU_CORS_ORIGINS", "").split(",") if o.strip()),
            nats_url=nats_url(env),
            internal_token=internal_token(env),
            session_addr=env_str(env, "KEFU_SESSION_ADDR", cls.session_addr),
            moderation_addr=env_str(env, "KEFU_MODERATION_ADDR", cls.moderation_addr),
            worker_addr=env_str(env, "KEFU_WORKER_ADDR", cls.worker_addr),
            model=env_str(env, "KEFU_MODEL", "") if env.get("KEFU_OPENAI_BASE_URL") else "",
            system_prompt=env_str(env, "KEFU_SYSTEM_PROMPT", cls.system_prompt),
            context_max_tokens=env_int(env, "KEFU_CONTEXT_MAX_TOKENS", cls.context_max_tokens, minimum=16),
            max_output_tokens=env_int(env, "KEFU_MAX_OUTPUT_TOKENS", cls.max_output_tokens, minimum=1,
                                      maximum=MAX_OUTPUT_TOKENS),
            tenant_max_output_tokens=parse_tenant_output_caps(env.get("KEFU_TENANT_MAX_OUTPUT_TOKENS", "")),
            rpc_timeout_s=env_float(env, "KEFU_RPC_TIMEOUT_S", cls.rpc_timeout_s, minimum=0.05),
            stream_timeout_s=env_float(env, "KEFU_STREAM_TIMEOUT_S", cls.stream_timeout_s, minimum=1),
            shutdown_grace_s=env_float(env, "KEFU_SHUTDOWN_GRACE_S", cls.shutdown_grace_s, minimum=0),
            log_level=env_str(env, "KEFU_LOG_LEVEL", cls.log_level),
            ws_heartbeat_s=env_float(env, "KEFU_WS_HEARTBEAT_S", cls.ws_heartbeat_s, minimum=1),
            ws_send_queue=env_int(env, "KEFU_WS_SEND_QUEUE", cls.ws_send_queue, minimum=8, maximum=65536),
            widget_tenants=frozenset(filter(None, (t.strip() for t in env.get("KEFU_WIDGET_TENANTS", "").split(",")))),
            widget_token_rps=env_float(env, "KEFU_WIDGET_TOKEN_RPS", cls.widget_token_rps, minimum=0.001),
            widget_token_burst=env_int(env, "KEFU_WIDGET_TOKEN_BURST", cls.widget_token_burst, minimum=1),
            widget_token_ttl_s=env_int(env, "KEFU_WIDGET_TOKEN_TTL_S", cls.widget_token_ttl_s, minimum=60,
                                       maximum=30 * 86400),
            console_token_ttl_s=env_int(env, "KEFU_CONSOLE_TOKEN_TTL_S", cls.console_token_ttl_s, minimum=60,
                                        maximum=30 * 86400),
            nats_replicas=env_int(env, "KEFU_NATS_REPLICAS", cls.nats_replicas, minimum=1, maximum=5),
            ws_frame_rps=env_float(env, "KEFU_WS_FRAME_RPS", cls.ws_frame_rps, minimum=0.1),
            ws_frame_burst=env_int(env, "KEFU_WS_FRAME_BURST", cls.ws_frame_burst, minimum=1),
            visitor_max_sockets=env_int(env, "KEFU_VISITOR_MAX_SOCKETS", cls.visitor_max_sockets, minimum=1,
                                        maximum=1000),
            visitor_max_conversations=env_int(env, "KEFU_VISITOR_MAX_CONVERSATIONS", cls.visitor_max_conversations,
                                              minimum=1, maximum=1000),
            answer_lease_s=env_float(env, "KEFU_ANSWER_LEASE_S", cls.answer_lease_s, minimum=1, maximum=300),
            handoff_keywords=tuple(k.strip() for k in env_str(env, "KEFU_HANDOFF_KEYWORDS", ",".join(
                cls.handoff_keywords)).split(",") if k.strip()),
            desk_poll_s=env_float(env, "KEFU_DESK_POLL_S", cls.desk_poll_s, minimum=0.05),
            max_history_messages=env_int(env, "KEFU_MAX_HISTORY_MESSAGES", cls.max_history_messages, minimum=1),
            trusted_proxies=_trusted_proxies(env.get("KEFU_TRUSTED_PROXIES", "")),
            account_check_s=env_float(env, "KEFU_ACCOUNT_CHECK_S", cls.account_check_s, minimum=0.1),
            kb_max_document_bytes=env_int(env, "KEFU_KB_MAX_DOCUMENT_BYTES", cls.kb_max_document_bytes, minimum=1,
                                          maximum=64 * 1024 * 1024),
            login_max_concurrent=env_int(env, "KEFU_LOGIN_MAX_CONCURRENT", cls.login_max_concurrent, minimum=1,
                                         maximum=64),
            login_max_per_s=env_float(env, "KEFU_LOGIN_MAX_PER_S", cls.login_max_per_s, minimum=0.01, maximum=10_000),
            login_address_failures=env_int(env, "KEFU_LOGIN_ADDRESS_FAILURES", cls.login_address_failures,
                                           minimum=1, maximum=100_000),
            login_user_failures=env_int(env, "KEFU_LOGIN_USER_FAILURES", cls.login_user_failures, minimum=1,
                                        maximum=100_000),
            login_failure_window_s=env_float(env, "KEFU_LOGIN_FAILURE_WINDOW_S", cls.login_failure_window_s,
                                             minimum=1),
            visitor_max_lifetime_s=env_int(env, "KEFU_VISITOR_MAX_LIFETIME_S", cls.visitor_max_lifetime_s,
                                           minimum=60, maximum=3650 * 86400),
            metrics_port=env_int(env, "KEFU_EDGE_METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            metrics_on_http_port=env_bool(env, "KEFU_METRICS_ON_HTTP_PORT", cls.metrics_on_http_port),
            conn_guard=env_bool(env, "KEFU_CONN_GUARD", cls.conn_guard),
            conn_rps=env_float(env, "KEFU_CONN_RPS", cls.conn_rps, minimum=0.01),
            conn_burst=env_int(env, "KEFU_CONN_BURST", cls.conn_burst, minimum=1, maximum=1_000_000),
            conn_max_refusals=env_int(env, "KEFU_CONN_MAX_REFUSALS", cls.conn_max_refusals, minimum=1,
                                      maximum=1_000_000),
            conn_penalty_s=env_float(env, "KEFU_CONN_PENALTY_S", cls.conn_penalty_s, minimum=0.01, maximum=3600),
            conn_max_penalty_s=env_float(env, "KEFU_CONN_MAX_PENALTY_S", cls.conn_max_penalty_s, minimum=0.01,
                                         maximum=86400),
            conn_max_addresses=env_int(env, "KEFU_CONN_MAX_ADDRESSES", cls.conn_max_addresses, minimum=1,
                                       maximum=10_000_000),
        )


def _trusted_proxies(raw: str) -> tuple[Network, ...]:
    try:
        return parse_trusted_proxies(raw)
    except ValueError as error:
        raise SettingsError(f"KEFU_TRUSTED_PROXIES: {error}") from None


def _pairs(raw: str, name: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SettingsError(f"{name}: expected key=value items separated by commas, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def parse_route_limits(raw: str) -> dict[str, tuple[float, int]]:
    """"/v1/chat=20:40,/v1/chat/completions=100" -> {route: (rps, burst)}; burst defaults to 2 x rps."""
    limits: dict[str, tuple[float, int]] = {}
    for route, value in _pairs(raw, "KEFU_RATE_LIMIT_ROUTES"):
        rps_text, _, burst_text = value.partition(":")
        try:
            rps = float(rps_text)
            burst = int(burst_text) if burst_text else max(1, int(rps * 2))
        except ValueError:
            raise SettingsError(f"KEFU_RATE_LIMIT_ROUTES: {route}: expected rps[:burst], got {value!r}") from None
        if rps <= 0 or burst < 1:
            raise SettingsError(f"KEFU_RATE_LIMIT_ROUTES: {route}: rps and burst must be positive")
        limits[route] = (rps, burst)
    return limits


def parse_tenant_output_caps(raw: str) -> dict[str, int]:
    caps: dict[str, int] = {}
    for tenant, value in _pairs(raw, "KEFU_TENANT_MAX_OUTPUT_TOKENS"):
        try:
            caps[tenant] = int(value)
        except ValueError:
            raise SettingsError(f"KEFU_TENANT_MAX_OUTPUT_TOKENS: {tenant}: expected an integer, "
                                f"got {value!r}") from None
        if not 1 <= caps[tenant] <= MAX_OUTPUT_TOKENS:
            raise SettingsError(f"KEFU_TENANT_MAX_OUTPUT_TOKENS: {tenant}: must be 1..{MAX_OUTPUT_TOKENS}")
    return caps


def parse_tenant_limits(raw: str) -> dict[str, float]:
    limits: dict[str, float] = {}
    for tenant, value in _pairs(raw, "KEFU_TENANT_RATE_LIMITS"):
        try:
            limits[tenant] = float(value)
        except ValueError:
            raise SettingsError(f"KEFU_TENANT_RATE_LIMITS: {tenant}: expected a number, got {value!r}") from None
        if limits[tenant] <= 0:
            raise SettingsError(f"KEFU_TENANT_RATE_LIMITS: {tenant}: must be positive")
    return limits
