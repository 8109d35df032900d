"""Settings of the edge, read once from `KEFU_*` variables (services.common.settings.KefuSettings)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator

from gateway.addresses import Network, parse_trusted_proxies
from services.common.settings import KefuSettings, SettingsError, check_secret

DEFAULT_SYSTEM_PROMPT = (
    "You are the customer-service assistant of an online shop. Answer politely and briefly, "
    "in the visitor's language. If you cannot help, offer to pass the visitor to a human agent."
)

MAX_OUTPUT_TOKENS = 32_768
"""The most output tokens any caller may ask for (OpenAI's max_tokens bound on /v1/chat/completions)."""


class GatewaySettings(KefuSettings):
    host: str = Field("127.0.0.1", validation_alias="KEFU_BIND_HOST")
    http_port: int = Field(8080, ge=0, le=65535)
    jwt_secret: str = Field("", repr=False)
    jwt_public_key_file: Path | None = None
    jwt_jwks_file: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_s: float = Field(30.0, ge=0)
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_message_chars: int = Field(8000, ge=1)
    rate_limit_rps: float = Field(1000.0, ge=0.001)
    rate_limit_burst: int = Field(2000, ge=1)
    tenant_rate_limit_rps: float = Field(5000.0, ge=0.001)
    route_rate_limits: Mapping[str, tuple[float, int]] = Field(default_factory=dict,
                                                               validation_alias="KEFU_RATE_LIMIT_ROUTES")
    """Per-route principal buckets, e.g. KEFU_RATE_LIMIT_ROUTES="/v1/chat=20:40" (rps:burst)."""
    tenant_rate_limits: Mapping[str, float] = Field(default_factory=dict)
    """Per-tenant rates, e.g. KEFU_TENANT_RATE_LIMITS="acme=200,beta=50"."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API ("*" for any); empty turns CORS off."""
    nats_url: str = Field("nats://127.0.0.1:4222", repr=False)
    """KEFU_NATS_URL: live-chat fan-out between edge processes and the edge's shared state (KV); may carry
    KEFU_NATS_USER / KEFU_NATS_PASSWORD (services.common.settings.nats_url), so never printed."""
    internal_token: str = Field("", repr=False)
    """KEFU_INTERNAL_TOKEN: sent on every call to the services (services.common.grpc_client); "" sends none."""
    session_addr: str = "127.0.0.1:50051"
    moderation_addr: str = "127.0.0.1:50052"
    worker_addr: str = "127.0.0.1:50053"
    model: str = ""
    """KEFU_MODEL: the default route's upstream model; picks the token encoding of its contexts."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    context_max_tokens: int = Field(3000, ge=16)
    max_output_tokens: int = Field(1024, ge=1, le=MAX_OUTPUT_TOKENS)
    """KEFU_MAX_OUTPUT_TOKENS: most tokens of one answer to a visitor (a larger max_tokens is clamped)."""
    tenant_max_output_tokens: Mapping[str, int] = Field(default_factory=dict)
    """KEFU_TENANT_MAX_OUTPUT_TOKENS: per-tenant caps over KEFU_MAX_OUTPUT_TOKENS, e.g. "acme=2048,beta=256"."""
    rpc_timeout_s: float = Field(5.0, ge=0.05)
    """Deadline of each call to moderation and session (unary, or one on the call streams)."""
    call_streams: int = Field(4, ge=1, le=64)
    """KEFU_CALL_STREAMS: long-lived call streams per service (session, moderation) carrying a turn's calls;
    each lands on a replica of its own (round_robin), so several spread the calls over the replicas."""
    stream_timeout_s: float = Field(300.0, ge=1)
    """Deadline of a whole answer stream."""
    shutdown_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM, how long streams in flight may run before the edge closes them."""
    log_level: str = "INFO"
    ws_heartbeat_s: float = Field(30.0, ge=1)
    """KEFU_WS_HEARTBEAT_S: the edge pings a WebSocket silent this long, and drops it after half as long again."""
    ws_send_queue: int = Field(256, ge=8, le=65536)
    """KEFU_WS_SEND_QUEUE: frames queued for one socket; a client that lets it fill is closed (1013)."""
    widget_tenants: frozenset[str] = frozenset()
    """KEFU_WIDGET_TENANTS: tenants whose anonymous visitors may get a token at POST /v1/widget/token."""
    widget_token_rps: float = Field(1.0, ge=0.001)
    """KEFU_WIDGET_TOKEN_RPS: tokens per second per client address (also the console login's rate)."""
    widget_token_burst: int = Field(10, ge=1)
    """KEFU_WIDGET_TOKEN_BURST: tokens one client address may take at once (also the console login's)."""
    widget_token_ttl_s: int = Field(86400, ge=60, le=30 * 86400)
    """KEFU_WIDGET_TOKEN_TTL_S: lifetime of a visitor token; renewable up to 30 days past its expiry."""
    console_token_ttl_s: int = Field(28800, ge=60, le=30 * 86400)
    """KEFU_CONSOLE_TOKEN_TTL_S: lifetime of an agent token from POST /v1/console/login."""
    nats_replicas: int = Field(1, ge=1, le=5)
    """KEFU_NATS_REPLICAS: JetStream replicas of the buckets the edge creates (canned replies, blacklist...)."""
    ws_frame_rps: float = Field(20.0, ge=0.1)
    """KEFU_WS_FRAME_RPS / KEFU_WS_FRAME_BURST: frames a socket may send; faster closes it (4008)."""
    ws_frame_burst: int = Field(60, ge=1)
    visitor_max_sockets: int = Field(5, ge=1, le=1000)
    """KEFU_VISITOR_MAX_SOCKETS: open WebSockets of one visitor on this edge process; one more is closed 4008."""
    visitor_max_conversations: int = Field(5, ge=1, le=1000)
    """KEFU_VISITOR_MAX_CONVERSATIONS (as the session service): conversations a visitor's socket may follow."""
    answer_lease_s: float = Field(15.0, ge=1, le=300)
    """KEFU_ANSWER_LEASE_S (as the session service): a streaming answer renews its lease every third of it."""
    handoff_keywords: tuple[str, ...] = ("转人工", "人工客服", "人工服务", "找人工", "真人", "人工", "human", "agent",
                                         "real person", "live agent")
    """KEFU_HANDOFF_KEYWORDS (comma-separated): a short visitor message with one of these asks for a human."""
    desk_poll_s: float = Field(2.0, ge=0.05)
    """KEFU_DESK_POLL_S: how often an edge with agents re-reads its tenants' queues (changes also push)."""
    max_history_messages: int = Field(200, ge=1)
    """KEFU_MAX_HISTORY_MESSAGES (as the session service): a resume from before the kept history is a resync."""
    kb_max_document_bytes: int = Field(10 * 1024 * 1024, ge=1, le=64 * 1024 * 1024)
    """KEFU_KB_MAX_DOCUMENT_BYTES (as the worker): an uploaded document over this is refused with 413."""
    trusted_proxies: tuple[Network, ...] = ()
    """KEFU_TRUSTED_PROXIES: networks of the proxies in front of the edge, whose X-Forwarded-For is believed."""
    account_check_s: float = Field(10.0, ge=0.1)
    """KEFU_ACCOUNT_CHECK_S: how long the edge trusts its last look at an agent account (a disabled one's tokens
    stop working within this, and its open sockets are closed within twice this)."""
    login_max_concurrent: int = Field(2, ge=1, le=64)
    """KEFU_LOGIN_MAX_CONCURRENT: argon2 password verifications at once in this process (19 MiB each); more
    logins wait up to a second, then get 429."""
    login_max_per_s: float = Field(10.0, ge=0.01, le=10_000)
    """KEFU_LOGIN_MAX_PER_S: argon2 verifications a second in this process (burst as many); more get 429 at once."""
    login_address_failures: int = Field(20, ge=1, le=100_000)
    """KEFU_LOGIN_ADDRESS_FAILURES: failed console logins per client address per KEFU_LOGIN_FAILURE_WINDOW_S."""
    login_user_failures: int = Field(10, ge=1, le=100_000)
    """KEFU_LOGIN_USER_FAILURES: failed console logins per tenant and user name per KEFU_LOGIN_FAILURE_WINDOW_S."""
    login_failure_window_s: float = Field(600.0, ge=1)
    """KEFU_LOGIN_FAILURE_WINDOW_S: the failure buckets refill fully over this (one failure per window/N)."""
    visitor_max_lifetime_s: int = Field(90 * 86400, ge=60, le=3650 * 86400)
    """KEFU_VISITOR_MAX_LIFETIME_S: how long a chain of renewed visitor tokens may last from its first token."""
    metrics_port: int = Field(9110, ge=0, le=65535, validation_alias="KEFU_EDGE_METRICS_PORT")
    """KEFU_EDGE_METRICS_PORT: Prometheus /metrics of the edge, apart from the public port; each edge
    process on a machine takes the first free port from this one upwards (workers: 9110, 9111, ...;
    above the services' 9101-9103); 0 picks any free port."""
    metrics_on_http_port: bool = False
    """KEFU_METRICS_ON_HTTP_PORT: also serve /metrics on the public HTTP port (older scrape setups)."""
    conn_guard: bool = True
    """KEFU_CONN_GUARD: close connections at accept from an address over KEFU_CONN_RPS / KEFU_CONN_BURST new
    connections, or in a penalty window after KEFU_CONN_MAX_REFUSALS 429s in a row on one connection (the
    window starts at KEFU_CONN_PENALTY_S and doubles up to KEFU_CONN_MAX_PENALTY_S); never a trusted proxy."""
    conn_rps: float = Field(50.0, ge=0.01)
    conn_burst: int = Field(500, ge=1, le=1_000_000)
    conn_max_refusals: int = Field(20, ge=1, le=1_000_000)
    conn_penalty_s: float = Field(1.0, ge=0.01, le=3600)
    conn_max_penalty_s: float = Field(60.0, ge=0.01, le=86400)
    conn_max_addresses: int = Field(50_000, ge=1, le=10_000_000)
    """KEFU_CONN_MAX_ADDRESSES: addresses the connection guard remembers (least recently seen forgotten first)."""

    # The parsed forms: a variable's text becomes its value; a value given to the constructor is kept.
    @field_validator("route_rate_limits", mode="before")
    @classmethod
    def _route_limits(cls, value: object) -> object:
        return parse_route_limits(value) if isinstance(value, str) else value

    @field_validator("tenant_rate_limits", mode="before")
    @classmethod
    def _tenant_limits(cls, value: object) -> object:
        return parse_tenant_limits(value) if isinstance(value, str) else value

    @field_validator("tenant_max_output_tokens", mode="before")
    @classmethod
    def _tenant_output_caps(cls, value: object) -> object:
        return parse_tenant_output_caps(value) if isinstance(value, str) else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip()) if isinstance(value, str) else value

    @field_validator("widget_tenants", "handoff_keywords", mode="before")
    @classmethod
    def _items(cls, value: object) -> object:
        return tuple(item.strip() for item in value.split(",") if item.strip()) if isinstance(value, str) else value

    @field_validator("widget_tenants")
    @classmethod
    def _tenant_names(cls, tenants: frozenset[str]) -> frozenset[str]:
        for tenant in tenants:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tenant):
                raise SettingsError(f"KEFU_WIDGET_TENANTS: {tenant!r} is not a tenant name (1-64 letters, digits, "
                                    "'_' or '-')")
        return tenants

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, value: object) -> object:
        return _trusted_proxies(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Self:
        check_secret("KEFU_JWT_SECRET", self.jwt_secret)
        if not self.jwt_secret and self.jwt_public_key_file is None and self.jwt_jwks_file is None:
            raise SettingsError("set KEFU_JWT_SECRET (HS256), KEFU_JWT_PUBLIC_KEY_FILE or KEFU_JWT_JWKS_FILE "
                                "(RS256/ES256)")
        for name, path in (("KEFU_JWT_PUBLIC_KEY_FILE", self.jwt_public_key_file),
                           ("KEFU_JWT_JWKS_FILE", self.jwt_jwks_file)):
            if path is not None and not path.is_file():
                raise SettingsError(f"{name}: no such file {path}")
        if self.conn_max_penalty_s < self.conn_penalty_s:
            raise SettingsError(f"KEFU_CONN_MAX_PENALTY_S ({self.conn_max_penalty_s:g}) must be at least "
                                f"KEFU_CONN_PENALTY_S ({self.conn_penalty_s:g})")
        return self

    @classmethod
    def resolved(cls, variables: Mapping[str, str]) -> dict[str, str]:
        resolved = super().resolved(variables)
        if not variables.get("KEFU_OPENAI_BASE_URL"):
            resolved.pop("KEFU_MODEL", None)  # the model names an upstream only the worker's base URL gives
        return resolved

    def output_cap(self, tenant: str) -> int:
        """Most tokens one answer to a visitor of `tenant` may have."""
        return self.tenant_max_output_tokens.get(tenant, self.max_output_tokens)


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
