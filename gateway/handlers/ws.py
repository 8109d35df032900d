"""GET /v1/ws: live chat over a WebSocket (docs/api.md "WebSocket protocol"); after the handshake the socket
is a gateway.live.wire.Wire driven by gateway.live.socket.LiveSocket, and this handler returns."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway import keys
from gateway.errors import ApiError
from gateway.live.connection import Connection
from gateway.live.frames import MAX_FRAME_BYTES
from gateway.live.socket import LiveSocket
from gateway.live.upgrade import Handshake, take_over
from gateway.live.wire import Wire

CLOSE_TIMEOUT_S = 5.0


async def websocket(request: web.Request) -> web.StreamResponse:
    app = request.app
    if app[keys.STATE].is_draining:
        raise ApiError("draining", "this edge is shutting down; retry on another", 503, headers={"Retry-After": "1"})
    settings = app[keys.SETTINGS]
    # No aiohttp heartbeat and no autoping: the hub's one keepalive pings the sockets that went silent
    # (gateway/live/keepalive.py), and LiveSocket answers pings and notes pongs.
    handshake = Handshake(compress=False, autoping=False)
    if not handshake.can_prepare(request).ok:
        raise ApiError("websocket_required", "this route speaks WebSocket only", 426, headers={"Upgrade": "websocket"})
    # The middleware sets it on plain responses only; the 101 is sent here, before it could.
    handshake.headers["X-Request-Id"] = request[keys.REQUEST_ID]
    await handshake.prepare(request)
    live = app[keys.LIVE]
    metrics = live.metrics
    wire = Wire(asyncio.get_running_loop(), MAX_FRAME_BYTES, CLOSE_TIMEOUT_S)
    connection = Connection(wire, settings.ws_send_queue, request.transport,
                            address=app[keys.CLIENT_ADDRESSES].of(request),
                            on_frame_out=metrics.count_ws_frame_out)
    socket = LiveSocket(live, connection, wire, request[keys.REQUEST_ID])
    authorization = request.headers.get("Authorization")
    try:
        take_over(request, wire, socket)  # last: no await after it (aiohttp may cancel this handler now)
    except ConnectionResetError:
        return handshake  # the client left during the handshake: aiohttp closes what is left
    live.hub.open(connection)
    socket.open(authorization)
    return handshake
