"""One WebSocket's read loop: frames decoded in order, `hello` first, then each dispatched to the visitor
or agent handlers; every refusal becomes an `error`, a `nack` or a close here."""

from __future__ import annotations

import asyncio
import logging

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

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
"""A socket that has not said `hello` by then is closed (4001)."""
MAX_BAD_FRAMES = 3
FLOOD_HOLD_S = 10.0
"""A visitor closed for a frame flood (4008) gets no new socket on this edge for this long."""


class LiveSocket:
    def __init__(self, live: LiveService, connection: Connection, authorization: str | None,
                 request_id: str) -> None:
        self._live = live
        self._connection = connection
        self._authorization = authorization
        """The upgrade request's Authorization header, if any (browsers send their token in hello)."""
        self._request_id = request_id
        self._bad_frames = 0
        self._context: SocketContext | None = None
        """Set once `hello` was welcomed."""

    async def run(self) -> None:
        try:
            header_principal = self._header_principal()
            while not self._connection.closing:
                message = await self._receive()
                if message is None:
                    return
                frame = self._decoded(message, header_principal)
                if frame is None:
                    continue
                if isinstance(frame, Hello):
                    self._context = await greet(self._live, self._connection, frame, header_principal,
                                                self._request_id)
                else:
                    assert self._context is not None
                    await _dispatch(self._context, frame)
        except SocketRefused as refused:
            self._connection.refuse(refused)

    def _header_principal(self) -> Principal | None:
        if self._authorization is None:
            return None
        try:
            return self._live.verifier.verify(bearer_token(self._authorization))
        except ApiError as error:
            raise SocketRefused(CLOSE_AUTH_FAILED, "unauthorized", error.message) from None

    async def _receive(self) -> WSMessage | None:
        """The next frame within the allowed rate; None once the socket ends."""
        connection = self._connection
        deadline = None if self._context else asyncio.get_running_loop().time() + HELLO_TIMEOUT_S
        while True:
            try:
                with connection.reading():
                    async with asyncio.timeout_at(deadline):
                        message = await connection.ws.receive()
            except TimeoutError:
                raise SocketRefused(CLOSE_AUTH_FAILED, "unauthorized", "no hello frame") from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if connection.closing and task is not None:  # our own close stopped the read
                    task.uncancel()
                    return None
                raise
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return None  # aiohttp already answered a close, or closed an oversized frame with 1009
            connection.heard()
            settings = self._live.settings
            if not connection.take_frame_token(settings.ws_frame_rps, settings.ws_frame_burst):
                principal = connection.principal
                if principal is not None and principal.role == "visitor":
                    self._live.socket_holds.hold(principal, FLOOD_HOLD_S)
                raise SocketRefused(CLOSE_RATE_LIMITED, "rate_limited", "too many frames")
            if message.type is WSMsgType.PING:
                await connection.ws.pong(message.data)
            elif message.type is not WSMsgType.PONG:  # a pong only says the client is there (heard above)
                return message

    def _decoded(self, message: WSMessage, header_principal: Principal | None) -> ClientFrame | None:
        """The client frame, or None after a bad one (an `error` frame, and the third closes the socket)."""
        try:
            if message.type is not WSMsgType.TEXT:
                raise FrameError("invalid_frame", "frames are JSON text")
            frame = decode(message.data, max_text_chars=self._live.settings.max_message_chars)
            self._live.metrics.ws_messages.labels("in", kind_of(frame)).inc()
            if self._context is None and not isinstance(frame, Hello):
                if header_principal is None:
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

