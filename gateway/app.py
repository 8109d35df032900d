"""create_app(settings): the aiohttp application of the edge."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.auth import JwtVerifier
from gateway.clients import BackendClients
from gateway.metrics import EdgeMetrics
from gateway.middlewares import auth_middleware, request_context_middleware
from gateway.ratelimit import TokenBucketLimiter
from gateway.routes import setup_routes
from gateway.settings import GatewaySettings


async def backend_clients(app: web.Application) -> AsyncIterator[None]:
    app[keys.CLIENTS] = BackendClients.connect(app[keys.SETTINGS])
    yield
    await app[keys.CLIENTS].close()


async def close_open_streams(app: web.Application) -> None:
    # On shutdown, end every SSE stream still open so the server can stop.
    for response in set(app[keys.OPEN_STREAMS]):
        try:
            await response.write_eof()
        except ConnectionError:
            pass


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(middlewares=[request_context_middleware, auth_middleware],
                          client_max_size=settings.max_body_bytes)
    app[keys.SETTINGS] = settings
    app[keys.VERIFIER] = JwtVerifier(settings)
    app[keys.METRICS] = EdgeMetrics()
    app[keys.PRINCIPAL_LIMITER] = TokenBucketLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
    app[keys.TENANT_LIMITER] = TokenBucketLimiter(
        settings.tenant_rate_limit_rps, max(settings.rate_limit_burst, int(settings.tenant_rate_limit_rps * 2)))
    app[keys.OPEN_STREAMS] = weakref.WeakSet()
    app.cleanup_ctx.append(backend_clients)
    app.on_shutdown.append(close_open_streams)
    setup_routes(app)
    return app
