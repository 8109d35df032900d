"""GET /v1/ws: live chat over a WebSocket (docs/api.md "WebSocket protocol"); the read loop is gateway.live.socket."""

from __future__ import annotations

from aiohttp import web

from gateway import keys
from gateway.errors import ApiError
from gateway.live.connection import Connection
from gateway.live.frames import MAX_FRAME_BYTES
from gateway.live.socket import LiveSocket

CLOSE_TIMEOUT_S = 5.0


async def websocket(request: web.Request) -> web.StreamResponse:
    app = request.app
    if app[keys.STATE].is_draining:
        raise ApiError("draining", "this edge is shutting down; retry on another", 503, headers={"Retry-After": "1"})
    settings = app[keys.SETTINGS]
    # No aiohttp heartbeat and no autoping: the hub's one keepalive pings the sockets that went silent
    # (gateway/live/keepalive.py), and the read loop answers pings and notes pongs.
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, compress=False, autoping=False, timeout=CLOSE_TIMEOUT_S)
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
