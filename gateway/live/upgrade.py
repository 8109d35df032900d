"""The seam between aiohttp and gateway/live/wire.py: aiohttp answers the WebSocket handshake, then lets go.

aiohttp 3.14 (pinned) has no public way to detach an upgraded connection. What it does have:
`WebSocketResponse` writes the 101 with the negotiated headers in `prepare` and only then (`_post_start`)
installs its frame reader on the HTTP protocol; bytes that arrive before a reader is installed wait in the
protocol's `_message_tail`. So: a response that skips `_post_start` (no reader, no queue) and whose
`write_eof` does nothing (aiohttp calls it when the handler returns, and would send a close frame), then
`transport.set_protocol(wire)` with that tail, and the HTTP protocol told its connection is gone, with
no transport left to close. aiohttp then forgets the connection: its request, handler task and
middleware frames are freed. tests/gateway/test_ws_wire.py holds each of these steps to account.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.live.wire import FrameSink, Wire


class Handshake(web.WebSocketResponse):
    """aiohttp's 101 (key, version and subprotocol checks, headers) without its reader."""

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: object) -> None:
        self._ws_protocol = protocol

    async def write_eof(self, data: bytes = b"") -> None:
        return None  # the socket lives on in a Wire: nothing of it ends with the handler


def take_over(request: web.Request, wire: Wire, sink: FrameSink) -> None:
    """After `await Handshake.prepare(request)`: from now on the transport talks to `wire` alone. Call it
    last in the handler, with no await after it: aiohttp (handler_cancellation) cancels the handler."""
    handler = request.protocol
    transport = request.transport
    # (no isinstance on the transport: uvloop's is no asyncio.Transport subclass)
    if not isinstance(handler, RequestHandler) or transport is None or transport.is_closing():
        raise ConnectionResetError("the connection is gone")
    early = handler._message_tail
    handler._message_tail = b""
    handler.transport = None  # its connection_lost below must not close the transport it no longer owns
    wire.start(sink, transport, early)
    handler.connection_lost(None)
