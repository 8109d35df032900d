"""Every piece of app state, declared once as a typed AppKey."""

from __future__ import annotations

import weakref

from aiohttp import web

from gateway.addresses import ClientAddresses
from gateway.auth import JwtVerifier, Principal
from gateway.bus import EdgeBus
from gateway.clients import BackendClients
from gateway.connection_guard import ConnectionGuard
from gateway.directory import Directory
from gateway.directory.account_status import AccountStatus
from gateway.directory.blacklist import Blacklist
from gateway.directory.tenants import TenantSettingsStore
from gateway.live.hub import LiveHub
from gateway.live.service import LiveService
from gateway.login_limits import LoginLimits
from gateway.metrics import EdgeMetrics
from gateway.ratelimit import EdgeRateLimits, TokenBucketLimiter
from gateway.readiness import Readiness
from gateway.settings import GatewaySettings
from gateway.state import EdgeState
from gateway.token_cache import VerifiedTokens

SETTINGS = web.AppKey("settings", GatewaySettings)
CLIENTS = web.AppKey("clients", BackendClients)
VERIFIER = web.AppKey("verifier", JwtVerifier)
VERIFIED_TOKENS = web.AppKey("verified_tokens", VerifiedTokens)
"""Bearer tokens verified in the last seconds (gateway/token_cache.py): what the HTTP routes check tokens with."""
METRICS = web.AppKey("metrics", EdgeMetrics)
BUS = web.AppKey("bus", EdgeBus)
"""The edge's NATS connection: live-chat fan-out and the KV buckets the edge reads and writes."""
RATE_LIMITS = web.AppKey("rate_limits", EdgeRateLimits)
ROUTE_ROLES = web.AppKey("route_roles", dict[str, frozenset[str]])
"""Roles each protected route accepts, by its canonical path (filled by setup_routes)."""
STATE = web.AppKey("state", EdgeState)
OPEN_STREAMS = web.AppKey("open_streams", weakref.WeakSet[web.StreamResponse])
LIVE_HUB = web.AppKey("live_hub", LiveHub)
"""Open WebSockets of this process and the conversation feeds they share (set by lifecycle.live_chat)."""
LIVE = web.AppKey("live", LiveService)
"""Everything the live-chat sockets share: hub, desks, clients, settings (set by lifecycle.live_chat)."""
DIRECTORY = web.AppKey("directory", Directory)
"""KV stores of canned replies, blacklist entries and agent accounts (set by lifecycle.directory)."""
BLACKLIST = web.AppKey("blacklist", Blacklist)
"""The watched in-memory blacklist: `blocks(tenant, visitor_id, address)`, `on_change(callback)`."""
ACCOUNT_STATUS = web.AppKey("account_status", AccountStatus)
"""Whether a staff principal's agent account was disabled (its tokens stop working)."""
TENANT_SETTINGS = web.AppKey("tenant_settings", TenantSettingsStore)
"""Per-tenant live-chat texts: `await get(tenant)` (cached, never fails) -> TenantSettings."""
CLIENT_ADDRESSES = web.AppKey("client_addresses", ClientAddresses)
"""The visitor's address of a request (the peer, or behind KEFU_TRUSTED_PROXIES the one they forwarded)."""
ADDRESS_LIMITS = web.AppKey("address_limits", dict[str, TokenBucketLimiter])
"""Per-client-address buckets of the public routes (widget token, console login), by route name."""
READINESS = web.AppKey("readiness", Readiness)
"""The backends' health for /readyz, asked at most once a second."""
LOGIN_LIMITS = web.AppKey("login_limits", LoginLimits)
"""Console logins: argon2 verification slots and threads, failed-login buckets per address and user name."""
CONNECTION_GUARD = web.AppKey("connection_guard", ConnectionGuard)
"""Per-address admission at accept and penalty windows (set by gateway.__main__; absent in aiohttp_client tests)."""

# Per request (set by the middlewares).
REQUEST_PRINCIPAL = web.RequestKey("principal", Principal)
REQUEST_ID = web.RequestKey("request_id", str)
