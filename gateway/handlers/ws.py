"""GET /v1/ws: live chat over a WebSocket (docs/api.md "WebSocket protocol"); the read loop is gateway.live.socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.errors import ApiError
from gateway.live.connection import Connection
from gateway.live.desk import Desks
from gateway.live.frames import CLOSE_DRAINING, MAX_FRAME_BYTES
from gateway.live.handoff import HandoffRules
from gateway.live.hub import LiveHub
from gateway.live.service import LiveService
from gateway.live.socket import LiveSocket

CLOSE_TIMEOUT_S = 5.0
DRAIN_POLL_S = 0.2


async def live_hub(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the hub and the desks; a draining edge closes its sockets with 1012 so
    clients resume elsewhere."""
    settings = app[keys.SETTINGS]
    hub = app[keys.LIVE_HUB] = LiveHub(app[keys.CLIENTS], settings, app[keys.BUS], app[keys.METRICS])
    desks = Desks(hub, app[keys.CLIENTS], app[keys.BUS], poll_s=settings.desk_poll_s,
                  rpc_timeout_s=settings.rpc_timeout_s)
    live = app[keys.LIVE] = LiveService(
        clients=app[keys.CLIENTS], settings=settings, hub=hub, desks=desks, metrics=app[keys.METRICS],
        state=app[keys.STATE], verifier=app[keys.VERIFIER], handoff_rules=HandoffRules(settings.handoff_keywords),
        tenant_settings=app.get(keys.TENANT_SETTINGS), blacklist=app.get(keys.BLACKLIST),
        accounts=app.get(keys.ACCOUNT_STATUS))
    if live.blacklist is not None:
        live.blacklist.on_change(live.close_blocked)
    state = app[keys.STATE]

    async def close_when_draining() -> None:
        # The drain flag is set by the process's signal handler, which knows nothing of sockets.
        while not state.draining:
            await asyncio.sleep(DRAIN_POLL_S)
        hub.close_all(CLOSE_DRAINING, "server draining")

    watchers = [asyncio.create_task(close_when_draining()),
                asyncio.create_task(live.watch_disabled_accounts(settings.account_check_s))]
    yield
    for watcher in watchers:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    await desks.aclose()
    await hub.aclose()


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: aiohttp would otherwise wait for every open socket's handler."""
    app[keys.LIVE_HUB].close_all(CLOSE_DRAINING, "server shutting down")


async def websocket(request: web.Request) -> web.StreamResponse:
    app = request.app
    if app[keys.STATE].draining:
        raise ApiError("draining", "this edge is shutting down; retry on another", 503, headers={"Retry-After": "1"})
    settings = app[keys.SETTINGS]
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, compress=False, heartbeat=settings.ws_heartbeat_s,
                               autoping=True, timeout=CLOSE_TIMEOUT_S)
    if not ws.can_prepare(request).ok:
        raise ApiError("websocket_required", "this route speaks WebSocket only", 426, headers={"Upgrade": "websocket"})
    # The middleware sets it on plain responses only; the 101 is sent here, before it could.
    ws.headers["X-Request-Id"] = request[keys.REQUEST_ID]
    await ws.prepare(request)
    live = app[keys.LIVE]
    metrics = live.metrics
    connection = Connection(ws, settings.ws_send_queue, request.transport,
                            address=app[keys.CLIENT_ADDRESSES].of(request),
                            on_frame_out=lambda kind: metrics.ws_messages.labels("out", kind).inc())
    live.hub.open(connection)
    try:
        await LiveSocket(live, connection, request.headers.get("Authorization"), request[keys.REQUEST_ID]).run()
    finally:
        live.hub.closed(connection)
        principal = connection.principal
        if principal is not None:  # greeted: counted (a visitor's socket too) and maybe at the desk
            metrics.ws_connections.labels(principal.role).dec()
            if connection.is_staff:
                live.desks.remove_agent(connection)
            else:
                live.release_socket(principal)
        await connection.finish(CLOSE_TIMEOUT_S)
    return ws
