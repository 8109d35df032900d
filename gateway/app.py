"""create_app(settings): the aiohttp application of the edge."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.addresses import ClientAddresses
from gateway.auth import JwtVerifier
from gateway.bus import EdgeBus
from gateway.clients import BackendClients
from gateway.directory.wiring import directory
from gateway.handlers import ws
from gateway.login_limits import LoginLimits
from gateway.metrics import EdgeMetrics
from gateway.middlewares import add_cors_headers, auth_middleware, cors_middleware, request_context_middleware
from gateway.ratelimit import EdgeRateLimits
from gateway.readiness import Readiness
from gateway.routes import setup_routes
from gateway.settings import GatewaySettings
from gateway.state import EdgeState
from gateway.token_cache import VerifiedTokens


async def backend_clients(app: web.Application) -> AsyncIterator[None]:
    app[keys.CLIENTS] = BackendClients.connect(app[keys.SETTINGS])
    yield
    await app[keys.CLIENTS].close()


async def nats_bus(app: web.Application) -> AsyncIterator[None]:
    bus = app[keys.BUS] = EdgeBus(app[keys.SETTINGS].nats_url)
    bus.start()
    yield
    await bus.close()


async def login_limits(app: web.Application) -> AsyncIterator[None]:
    limits = app[keys.LOGIN_LIMITS] = LoginLimits.of(app[keys.SETTINGS])
    yield
    limits.close()  # its argon2 threads


async def close_readiness(app: web.Application) -> None:
    await app[keys.READINESS].aclose()  # a round of health checks still in flight


async def close_open_streams(app: web.Application) -> None:
    # On shutdown, end every SSE stream still open so the server can stop.
    open_streams = app[keys.OPEN_STREAMS]
    for response in set(open_streams):
        try:
            await response.write_eof()
        except ConnectionError:
            pass


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
    app.cleanup_ctx.append(nats_bus)
    app.cleanup_ctx.append(directory)  # KV stores and the watched blacklist; needs the bus above, never waits for it
    app.cleanup_ctx.append(backend_clients)
    app.cleanup_ctx.append(login_limits)
    app.cleanup_ctx.append(ws.live_hub)  # shared conversation feeds; needs the clients above
    app.on_shutdown.append(ws.close_sockets)  # 1012: reconnect elsewhere
    app.on_shutdown.append(close_open_streams)
    app.on_shutdown.append(close_readiness)
    app.on_response_prepare.append(add_cors_headers)
    setup_routes(app)
    return app
