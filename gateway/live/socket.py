"""One WebSocket's frames, driven from its Wire: decoded in order, `hello` first, then each dispatched to
the visitor or agent handlers; every refusal becomes an `error`, a `nack` or a close here.

No task waits on an idle socket: a frame that arrives is queued, and a task runs only while the queue
has frames to handle (one at a time, in order, as the old read loop did); the hello deadline is a timer.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque

from aiohttp import WSMessage, WSMsgType

from gateway.auth import Principal, bearer_token
from gateway.errors import ApiError, FrameError, SocketRefused
from gateway.live import agent, visitor
from gateway.live.connection import Connection
from gateway.live.context import SocketContext
from gateway.live.frames import (
    CLOSE_AUTH_FAILED,
    CLOSE_BAD_FRAMES,
    CLOSE_RATE_LIMITED,
    AgentFrame,
    ClientFrame,
    ErrorFrame,
    Handoff,
    Hello,
    Ping,
    Pong,
    Read,
    Send,
    Typing,
    decode,
    kind_of,
)
from gateway.live.hello import greet
from gateway.live.service import LiveService
from gateway.live.wire import Wire
from services.common.logs import request_id_var

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
"""A socket that has not said `hello` by then is closed (4001)."""
MAX_BAD_FRAMES = 3
FLOOD_HOLD_S = 10.0
"""A visitor closed for a frame flood (4008) gets no new socket on this edge for this long."""
INBOX_PAUSE = 32
"""Frames waiting to be handled before the socket is read no further (resumed once they are)."""


class LiveSocket:
    """The FrameSink of one socket's Wire (gateway/live/wire.py), from the upgrade to its end."""

    __slots__ = ("_live", "_connection", "_wire", "_header_principal", "_request_id", "_bad_frames", "_context",
                 "_inbox", "_worker", "_hello_timer", "_hello_seen", "_ended")

    def __init__(self, live: LiveService, connection: Connection, wire: Wire, request_id: str) -> None:
        self._live = live
        self._connection = connection
        self._wire = wire
        self._header_principal: Principal | None = None
        """Who the upgrade request's Authorization header says (browsers send their token in hello)."""
        self._request_id = request_id
        self._bad_frames = 0
        self._context: SocketContext | None = None
        """Set once `hello` was welcomed."""
        self._inbox: deque[WSMessage | SocketRefused] | None = None
        """Frames not handled yet (None when there are none: an idle socket holds no deque)."""
        self._worker: asyncio.Task[None] | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._hello_seen = False
        self._ended = False

    def _log_context(self) -> contextvars.Context:
        """A context naming the upgrade's request id (in every log line of the work its frames cause), made
        when work starts: an idle socket keeps none."""
        context = contextvars.Context()
        context.run(request_id_var.set, self._request_id)
        return context

    def open(self, authorization: str | None) -> None:
        """The upgrade is done: check its Authorization header (if any), and start the hello deadline."""
        try:
            if authorization is not None:
                try:
                    self._header_principal = self._live.verifier.verify(bearer_token(authorization))
                except ApiError as error:
                    raise SocketRefused(CLOSE_AUTH_FAILED, "unauthorized", error.message) from None
        except SocketRefused as refused:
            self._connection.refuse(refused)
            return
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, self._hello_overdue,
                                                                  context=self._log_context())

    # -- from the wire ----------------------------------------------------------------------------

    def on_frame(self, message: WSMessage) -> None:
        connection = self._connection
        if message.type is WSMsgType.CLOSE:
            # Answered once the frames before it are handled and what they caused is sent (1000, as aiohttp).
            if self._worker is None or connection.closing:
                connection.close(1000)
            else:
                self._queue(message)
            return
        if connection.closing or self._ended or (self._inbox and isinstance(self._inbox[-1], SocketRefused)):
            return  # nothing after a refusal is handled
        connection.heard()
        settings = self._live.settings
        if not connection.take_frame_token(settings.ws_frame_rps, settings.ws_frame_burst):
            principal = connection.principal
            if principal is not None and principal.role == "visitor":
                self._live.socket_holds.hold(principal, FLOOD_HOLD_S)
            # In order: what came before is still handled, then the refusal; nothing after it.
            self._queue(SocketRefused(CLOSE_RATE_LIMITED, "rate_limited", "too many frames"))
            self._wire.pause_reading()
            return
        if message.type is WSMsgType.PING:
            try:
                self._wire.pong(message.data)
            except ConnectionResetError:
                pass
        elif message.type is not WSMsgType.PONG:  # a pong only says the client is there (heard above)
            self._queue(message)

    def on_end(self) -> None:
        """The transport is gone (closed by either side): the frame in hand is cancelled (as aiohttp's
        handler_cancellation did to the read loop), then the socket leaves everything."""
        if self._ended:
            return
        self._ended = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._connection.lost()
        if self._worker is not None:
            self._worker.cancel()  # it leaves in its finally
        else:
            self._leave()

    # -- handling, in order ------------------------------------------------------------------------

    def _queue(self, item: WSMessage | SocketRefused) -> None:
        if self._inbox is None:
            self._inbox = deque()
        self._inbox.append(item)
        if len(self._inbox) >= INBOX_PAUSE:
            self._wire.pause_reading()
        if self._worker is None:
            self._worker = asyncio.create_task(self._handle_queued(), context=self._log_context())

    async def _handle_queued(self) -> None:
        try:
            while self._inbox and not self._connection.closing:
                item = self._inbox.popleft()
                if not self._inbox:
                    self._inbox = None
                if isinstance(item, SocketRefused):
                    raise item
                if item.type is WSMsgType.CLOSE:
                    self._connection.close(1000)
                    return
                frame = self._decoded(item)
                if frame is None:
                    continue
                if isinstance(frame, Hello):
                    self._hello_seen = True
                    self._context = await greet(self._live, self._connection, frame, self._header_principal,
                                                self._request_id)
                    if self._hello_timer is not None:
                        self._hello_timer.cancel()
                        self._hello_timer = None
                else:
                    assert self._context is not None
                    await _dispatch(self._context, frame)
        except SocketRefused as refused:
            self._connection.refuse(refused)
        finally:
            self._worker = None
            if self._ended:
                self._leave()
            elif self._connection.closing:
                self._inbox = None  # nothing more is handled; the close handshake ends the socket
            else:
                self._wire.resume_reading()  # if the inbox had filled up (a no-op otherwise)

    def _hello_overdue(self) -> None:
        self._hello_timer = None
        if not self._hello_seen and not self._connection.closing:
            self._connection.refuse(SocketRefused(CLOSE_AUTH_FAILED, "unauthorized", "no hello frame"))

    def _decoded(self, message: WSMessage) -> ClientFrame | None:
        """The client frame, or None after a bad one (an `error` frame, and the third closes the socket)."""
        try:
            if message.type is not WSMsgType.TEXT:
                raise FrameError("invalid_frame", "frames are JSON text")
            frame = decode(message.data, max_text_chars=self._live.settings.max_message_chars)
            self._live.metrics.ws_messages.labels("in", kind_of(frame)).inc()
            if self._context is None and not isinstance(frame, Hello):
                if self._header_principal is None:
                    raise SocketRefused(CLOSE_AUTH_FAILED, "unauthorized", "the first frame must be hello")
                raise FrameError("invalid_frame", "the first frame must be hello")
            if self._context is not None and isinstance(frame, Hello):
                raise FrameError("invalid_frame", "hello was already sent")
        except FrameError as error:
            self._bad_frames += 1
            self._connection.send(ErrorFrame(error.code, error.message))
            if self._bad_frames >= MAX_BAD_FRAMES:
                self._connection.close(CLOSE_BAD_FRAMES, "too many bad frames")
            return None
        return frame

    def _leave(self) -> None:
        """The socket ended: it leaves its feeds, the desk, the counts (what the handler's finally did)."""
        live = self._live
        connection = self._connection
        live.hub.closed(connection)
        principal = connection.principal
        if principal is not None:  # greeted: counted (a visitor's socket too) and maybe at the desk
            live.metrics.ws_connections.labels(principal.role).dec()
            if connection.is_staff:
                live.desks.remove_agent(connection)
            else:
                live.release_socket(principal)


async def _dispatch(context: SocketContext, frame: Send | Ping | Typing | Read | Handoff | AgentFrame) -> None:
    """Run one frame's handler; what it refuses is nacked (or closes the socket) in `context.fail`."""
    kind = kind_of(frame)
    cid = getattr(frame, "cid", None)
    conversation_id = getattr(frame, "conversation_id", None)
    try:
        match frame:
            case Ping():
                context.connection.send(Pong())
            case Send() if context.connection.is_staff:
                await agent.send(context, frame)
            case Send():
                await visitor.send(context, frame)
            case Typing():
                visitor.typing(context, frame)
            case Read():
                visitor.read(context, frame)
            case Handoff():
                await visitor.handoff(context, frame)
            case _ if not context.connection.is_staff:
                context.fail(kind, ApiError("forbidden", f"{kind} is for agents", 403), cid=cid,
                             conversation_id=conversation_id)
            case _:
                await agent.handle(context, frame)
    except ApiError as error:
        context.fail(kind, error, cid=cid, conversation_id=conversation_id)

