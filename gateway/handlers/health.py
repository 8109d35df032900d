"""Liveness, readiness and metrics: public, unauthenticated."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import keys
from gateway.responses import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[keys.STATE].is_draining:
        return json_response({"status": "draining"}, status=503)
    backends = await request.app[keys.READINESS].backends()
    ready = all(backends.values())
    return json_response({"status": "ready" if ready else "not_ready", "backends": backends},
                             status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[keys.METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
