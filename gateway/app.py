"""create_app(settings): the aiohttp application of the edge (its start-up and clean-up: gateway.lifecycle)."""

from __future__ import annotations

import weakref

from aiohttp import web

from gateway import keys, lifecycle
from gateway.addresses import ClientAddresses
from gateway.auth import JwtVerifier
from gateway.metrics import EdgeMetrics
from gateway.middlewares import add_cors_headers, auth_middleware, cors_middleware, request_context_middleware
from gateway.ratelimit import EdgeRateLimits
from gateway.readiness import Readiness
from gateway.routes import setup_routes
from gateway.settings import GatewaySettings
from gateway.state import EdgeState
from gateway.token_cache import VerifiedTokens


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(middlewares=[cors_middleware, request_context_middleware, auth_middleware],
                          client_max_size=settings.max_body_bytes)
    app[keys.SETTINGS] = settings
    app[keys.VERIFIER] = JwtVerifier(settings)
    app[keys.VERIFIED_TOKENS] = VerifiedTokens(app[keys.VERIFIER])
    app[keys.CLIENT_ADDRESSES] = ClientAddresses(settings.trusted_proxies)
    app[keys.METRICS] = EdgeMetrics()
    app[keys.RATE_LIMITS] = EdgeRateLimits(
        settings.rate_limit_rps, settings.rate_limit_burst, settings.tenant_rate_limit_rps,
        routes=settings.route_rate_limits, tenants=settings.tenant_rate_limits)
    app[keys.ROUTE_ROLES] = {}
    app[keys.STATE] = EdgeState()
    app[keys.READINESS] = Readiness(lambda: app[keys.CLIENTS].health(timeout_s=1.0),
                                    on_round=app[keys.METRICS].readiness_rounds.inc)
    app[keys.OPEN_STREAMS] = weakref.WeakSet()
    lifecycle.wire(app)
    app.on_response_prepare.append(add_cors_headers)
    setup_routes(app)
    return app
