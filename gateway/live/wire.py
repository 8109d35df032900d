"""A WebSocket after its handshake, as an asyncio protocol: frames in through aiohttp's parser, out whole.

aiohttp would keep, per open socket, the upgrade request with its headers, the HTTP protocol and its task,
the handler's task and every middleware's suspended frame, and a reader queue awaited by a read loop
(~34 KiB per idle socket, issue 19). Here the transport talks to a `Wire` alone (gateway/live/upgrade.py
hands it over): a socket with nothing to do holds this object, aiohttp's frame parser and its transport.
The parser is aiohttp's own `WebSocketReader` (pinned with aiohttp: masking, fragments, size limit, UTF-8,
close codes); what it parses is handed to the `FrameSink`, in order, from `data_received`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Protocol

from aiohttp import WSCloseCode, WSMessage, WSMsgType
from aiohttp._websocket.models import WSMessageTextBytes
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_websocket import WebSocketError

log = logging.getLogger(__name__)

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
CLOSE_NO_STATUS = 1005
"""The close code recorded for a peer's close frame without one (RFC 6455 7.1.5)."""


class FrameSink(Protocol):
    """Who gets a socket's frames: every data, ping, pong and the peer's close frame in order (a close is
    answered with the Wire's `close` once what came before it is handled and sent), then the end, once."""

    def on_frame(self, message: WSMessage) -> None: ...

    def on_end(self) -> None: ...


def frame(opcode: int, payload: bytes) -> bytes:
    """A server frame: FIN, the opcode, no mask (RFC 6455 5.1: a server never masks)."""
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", 0x80 | opcode, length) + payload
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, length) + payload


def close_payload(code: int, reason: bytes) -> bytes:
    return struct.pack("!H", code) + reason[:123]  # a control frame's payload is at most 125 bytes


class _Handoff(WebSocketDataQueue):
    """aiohttp's parser pushes every message into a queue; this one hands each on at once and holds none.

    Its base's __init__ is not called on purpose: it would build a deque and a waiter slot for frames this
    queue never holds (~850 bytes a socket). The parser reads only the size and limit fields (both 0 here,
    so it never stalls) besides these three methods; tests/gateway/test_ws_wire.py feeds it frame by frame
    and byte by byte."""

    __slots__ = ("_wire",)

    def __init__(self, wire: Wire) -> None:
        self._wire = wire

    def feed_data(self, data: WSMessage | WSMessageTextBytes, size: int) -> None:
        # decode_text=True: text arrives as str, so every message is a WSMessage
        self._wire.on_message(WSMessage(*data) if not isinstance(data, WSMessage) else data)

    def set_exception(self, exc: BaseException, exc_cause: BaseException | None = None) -> None:
        self._wire.on_bad_input(exc)

    def feed_eof(self) -> None:
        pass  # the transport's own connection_lost says it


class Wire(BaseProtocol):
    """One WebSocket's transport after the upgrade: `send_str` and `close` like aiohttp's WebSocketResponse
    (the Connection's writer uses them), the peer's close handshake, and flow control both ways."""

    __slots__ = ("_reader", "_sink", "_close_sent", "_peer_closing", "_peer_closed", "_close_code", "_timeout_s",
                 "_ended")

    def __init__(self, loop: asyncio.AbstractEventLoop, max_frame_bytes: int, close_timeout_s: float) -> None:
        super().__init__(loop)
        self._upgraded = True  # BaseProtocol: pausing the reads touches no HTTP parser
        self._reader = WebSocketReader(_Handoff(self), max_frame_bytes, compress=False, decode_text=True)
        self._sink: FrameSink | None = None
        self._close_sent = False
        self._peer_closing = False
        """The peer's close frame came first: ours answers it, and nothing more is waited for."""
        self._peer_closed: asyncio.Future[None] | None = None
        """Created only while our close waits for the peer's."""
        self._close_code: int | None = None
        self._timeout_s = close_timeout_s
        self._ended = False

    def start(self, sink: FrameSink, transport: asyncio.Transport, early: bytes) -> None:
        """Take the transport over (aiohttp's protocol lets go of it in gateway/live/upgrade.py); `early`:
        what the client sent before the switch, parsed first."""
        self._sink = sink
        transport.set_protocol(self)
        self.connection_made(transport)
        if early:
            self.data_received(early)
        if not transport.is_reading() and not self._reading_paused:
            transport.resume_reading()  # aiohttp may have paused it for its own buffers

    @property
    def close_code(self) -> int | None:
        """The code of the first close frame either side sent (None before)."""
        return self._close_code

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._ended:
            self._reader.feed_data(data)

    def eof_received(self) -> bool:
        return False  # the peer half-closed: close our side too (connection_lost follows)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._resolve_peer_close()
        if not self._ended:
            self._ended = True
            if self._close_code is None:
                self._close_code = WSCloseCode.ABNORMAL_CLOSURE
            if self._sink is not None:
                self._sink.on_end()

    # -- frames in (from the parser, inside data_received) ---------------------------------------

    def on_message(self, message: WSMessage) -> None:
        if message.type is WSMsgType.CLOSE:
            self._peer_close(message.data if isinstance(message.data, int) and message.data else CLOSE_NO_STATUS)
        elif self._close_sent:
            pass  # after our close frame, only the peer's close matters (RFC 6455 5.5.1)
        elif self._sink is not None:
            self._sink.on_frame(message)

    def on_bad_input(self, exc: BaseException) -> None:
        """Oversized (1009), invalid UTF-8 (1007) or a protocol error (1002): close with its code, at once."""
        code = exc.code if isinstance(exc, WebSocketError) else WSCloseCode.PROTOCOL_ERROR
        log.debug("closing a socket on bad input: %s", exc)
        self._send_close(code, b"")
        self.abort()

    def _peer_close(self, code: int) -> None:
        if self._close_sent:
            self._resolve_peer_close()  # the answer to ours: the handshake is done
            self.abort()
            return
        if self._peer_closing:
            return
        self._peer_closing = True
        if self._close_code is None:
            self._close_code = code
        if self._sink is not None:
            self._sink.on_frame(WSMessage(WSMsgType.CLOSE, code, ""))  # it answers with `close`
        else:
            self._send_close(WSCloseCode.OK, b"")
            self.abort()

    def _resolve_peer_close(self) -> None:
        if self._peer_closed is not None and not self._peer_closed.done():
            self._peer_closed.set_result(None)

    # -- frames out ------------------------------------------------------------------------------

    def write_frame(self, opcode: int, payload: bytes) -> None:
        """A whole frame now (frames never interleave); ConnectionResetError once the socket closes."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the socket is closed")
        transport.write(frame(opcode, payload))

    def pong(self, payload: bytes) -> None:
        if not self._close_sent:
            self.write_frame(OP_PONG, payload)

    async def send_str(self, data: str) -> None:
        if self._close_sent:
            raise ConnectionResetError("the socket is closing")
        self.write_frame(OP_TEXT, data.encode())
        if self._paused:
            await self._drain_helper()  # the peer reads slower than we write: wait for it (backpressure)

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        """Our close frame, then (`drain`) up to the close timeout for the peer's; then the transport goes.
        False when the socket was closing already."""
        if self._close_sent or self.transport is None:
            self.abort()
            return False
        self._send_close(code, message)
        if drain and self.transport is not None and not self._ended and not self._peer_closing:
            self._peer_closed = self._loop.create_future()
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._peer_closed
            except TimeoutError:
                pass
            finally:
                self._peer_closed = None
        self.abort()
        return True

    def _send_close(self, code: int, reason: bytes) -> None:
        if self._close_sent:
            return
        self._close_sent = True
        if self._close_code is None:
            self._close_code = code
        try:
            self.write_frame(OP_CLOSE, close_payload(code, reason))
        except ConnectionResetError:
            pass

    def abort(self) -> None:
        """End the transport (what is buffered is still sent); connection_lost follows."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
