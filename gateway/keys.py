"""Every piece of app state, declared once as a typed AppKey."""

from __future__ import annotations

import weakref

from aiohttp import web

from gateway.auth import JwtVerifier, Principal
from gateway.clients import BackendClients
from gateway.metrics import EdgeMetrics
from gateway.ratelimit import TokenBucketLimiter
from gateway.settings import GatewaySettings

SETTINGS = web.AppKey("settings", GatewaySettings)
CLIENTS = web.AppKey("clients", BackendClients)
VERIFIER = web.AppKey("verifier", JwtVerifier)
METRICS = web.AppKey("metrics", EdgeMetrics)
PRINCIPAL_LIMITER = web.AppKey("principal_limiter", TokenBucketLimiter)
TENANT_LIMITER = web.AppKey("tenant_limiter", TokenBucketLimiter)
OPEN_STREAMS = web.AppKey("open_streams", weakref.WeakSet[web.StreamResponse])

# Per request (set by the middlewares).
REQUEST_PRINCIPAL = web.RequestKey("principal", Principal)
REQUEST_ID = web.RequestKey("request_id", str)
