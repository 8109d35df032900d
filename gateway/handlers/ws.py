"""GET /v1/ws: live chat over a WebSocket (visitors; agents come with the handoff slice)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from aiohttp import WSMsgType, web

from gateway import keys
from gateway.auth import Principal, bearer_token
from gateway.chat_turn import ChatTurn, DuplicateMessage, StreamFailed, TurnDelta, TurnEvent, TurnRequest, TurnStarted
from gateway.errors import ApiError
from gateway.live.connection import Connection
from gateway.live.frames import (
    CLOSE_AUTH_FAILED,
    CLOSE_BAD_FRAMES,
    CLOSE_DRAINING,
    CLOSE_FORBIDDEN,
    MAX_FRAME_BYTES,
    FrameError,
    Hello,
    Ping,
    Send,
    Unsupported,
    error_frame,
    message_id_for,
    nack_frame,
    parse_frame,
)
from gateway.live.hub import FeedUnavailable, LiveHub, NotYours

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
"""A socket that has not said `hello` by then is closed (4001)."""
MAX_BAD_FRAMES = 3
CLOSE_TIMEOUT_S = 5.0
OWN_CIDS = 1024
"""cids a socket remembers to echo in its own `msg` events."""
DRAIN_POLL_S = 0.2
AGENT_TYPES = frozenset({"claim", "release", "transfer", "close", "note"})


async def live_hub(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the hub; a draining edge closes its sockets with 1012 so clients resume elsewhere."""
    hub = app[keys.LIVE_HUB] = LiveHub(app[keys.CLIENTS], app[keys.SETTINGS])
    state = app[keys.STATE]

    async def close_when_draining() -> None:
        # The drain flag is set by the process's signal handler, which knows nothing of sockets.
        while not state.draining:
            await asyncio.sleep(DRAIN_POLL_S)
        hub.close_all(CLOSE_DRAINING, "server draining")

    watcher = asyncio.create_task(close_when_draining())
    yield
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
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
    hub = app[keys.LIVE_HUB]
    socket = Connection(ws, settings.ws_send_queue, request.transport)
    hub.connections.add(socket)
    try:
        await LiveSocket(request, socket, hub).run()
    finally:
        hub.leave_all(socket)
        hub.connections.discard(socket)
        await socket.finish(CLOSE_TIMEOUT_S)
    return ws


class LiveSocket:
    """The dialogue of one socket: its frames are handled one after the other, in order."""

    def __init__(self, request: web.Request, socket: Connection, hub: LiveHub) -> None:
        self._request = request
        self._app = request.app
        self._settings = request.app[keys.SETTINGS]
        self._socket = socket
        self._hub = hub
        self._bad_frames = 0

    async def run(self) -> None:
        ws = self._socket.ws
        header = self._request.headers.get("Authorization")
        header_principal: Principal | None = None
        if header is not None:
            try:
                header_principal = self._app[keys.VERIFIER].verify(bearer_token(header))
            except ApiError as error:
                self._refuse(CLOSE_AUTH_FAILED, "unauthorized", error.message)
                return
        greeted = False
        while not self._socket.closing:
            try:
                message = await ws.receive(timeout=None if greeted else HELLO_TIMEOUT_S)
            except TimeoutError:
                self._refuse(CLOSE_AUTH_FAILED, "unauthorized", "no hello frame")
                return
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return  # aiohttp already answered a close, or closed an oversized frame with 1009
            try:
                if message.type is not WSMsgType.TEXT:
                    raise FrameError("invalid_frame", "frames are JSON text")
                frame = parse_frame(message.data, max_text_chars=self._settings.max_message_chars)
                if not greeted and not isinstance(frame, Hello):
                    if header_principal is None:
                        self._refuse(CLOSE_AUTH_FAILED, "unauthorized", "the first frame must be hello")
                        return
                    raise FrameError("invalid_frame", "the first frame must be hello")
                if greeted and isinstance(frame, Hello):
                    raise FrameError("invalid_frame", "hello was already sent")
            except FrameError as error:
                self._bad_frame(error)
                continue
            if isinstance(frame, Hello):
                greeted = await self._hello(frame, header_principal)
            elif isinstance(frame, Send):
                await self._send(frame)
            elif isinstance(frame, Ping):
                self._socket.send({"type": "pong"})
            else:
                self._unsupported(frame)

    def _refuse(self, code: int, error_code: str, message: str) -> None:
        self._socket.send(error_frame(error_code, message))
        self._socket.close(code, message[:100])

    def _bad_frame(self, error: FrameError) -> None:
        self._bad_frames += 1
        self._socket.send(error_frame(error.code, error.message))
        if self._bad_frames >= MAX_BAD_FRAMES:
            self._socket.close(CLOSE_BAD_FRAMES, "too many bad frames")

    async def _hello(self, hello: Hello, principal: Principal | None) -> bool:
        if principal is None:
            if hello.token is None:
                self._refuse(CLOSE_AUTH_FAILED, "unauthorized", "send Authorization: Bearer or a token in hello")
                return False
            try:
                principal = self._app[keys.VERIFIER].verify(hello.token)
            except ApiError as error:
                self._refuse(CLOSE_AUTH_FAILED, "unauthorized", error.message)
                return False
        if principal.role != "visitor":
            self._refuse(CLOSE_FORBIDDEN, "forbidden", "this edge serves visitor sockets only for now")
            return False
        socket = self._socket
        socket.principal = principal
        socket.hold()  # the welcome goes before any replayed event
        results: list[dict[str, Any]] = []
        for point in hello.resume:
            try:
                await self._hub.join(socket, principal, point.conversation_id, point.after_seq)
            except NotYours:
                socket.drop_held()
                self._refuse(CLOSE_FORBIDDEN, "forbidden", "not your conversation")
                return False
            except FeedUnavailable as error:
                socket.drop_held()
                self._refuse(1011, "unavailable", f"session service unavailable: {error}")
                return False
            results.append({"conversation_id": point.conversation_id, "result": "ok"})
        # Without `resume` the conversation starts with the first `send` (the session service
        # creates a session only with a message in it), so `conversation_id` is null until then.
        socket.current = hello.resume[0].conversation_id if hello.resume else None
        socket.release({"type": "welcome", "conversation_id": socket.current, "status": "ai",
                        "heartbeat_s": self._settings.ws_heartbeat_s, "epoch": self._hub.epoch,
                        "resume": results})
        return True

    async def _send(self, send: Send) -> None:
        socket = self._socket
        principal = socket.principal
        assert principal is not None
        message_id = message_id_for(principal.tenant, principal.subject, send.cid)
        socket.own_cids[message_id] = send.cid
        if len(socket.own_cids) > OWN_CIDS:
            del socket.own_cids[next(iter(socket.own_cids))]
        conversation_id = send.conversation_id or socket.current
        if conversation_id is not None:
            try:
                if conversation_id not in socket.conversations:
                    await self._hub.join(socket, principal, conversation_id, None)
                seq = await self._hub.find(principal, conversation_id, message_id, 0)
            except NotYours:
                self._refuse(CLOSE_FORBIDDEN, "forbidden", "not your conversation")
                return
            except FeedUnavailable as error:
                socket.send(nack_frame("send", "unavailable", str(error), cid=send.cid,
                                       conversation_id=conversation_id))
                return
            if seq is not None:
                # Stored before (a retry): the same seq again, and no second answer.
                socket.send({"type": "ack", "cid": send.cid, "seq": seq, "duplicate": True})
                return
        # The turn runs in the hub: the answer is generated and stored even if this socket
        # drops meanwhile; this socket's next frame waits for it (frames are handled in order).
        await asyncio.shield(self._hub.spawn(self._turn(principal, conversation_id, send, message_id)))

    async def _turn(self, principal: Principal, conversation_id: str | None, send: Send, message_id: str) -> None:
        state = self._app[keys.STATE]
        state.open_streams += 1  # a draining edge lets the answer finish and be stored
        try:
            await self._run_turn(principal, conversation_id, send, message_id)
        finally:
            state.open_streams -= 1

    async def _run_turn(self, principal: Principal, conversation_id: str | None, send: Send,
                        message_id: str) -> None:
        socket, hub = self._socket, self._hub
        turn = ChatTurn(self._app[keys.CLIENTS], self._settings, principal, self._request[keys.REQUEST_ID])
        # run() is an async generator (typed as an iterator): close it to end its gRPC streams.
        events = cast(AsyncGenerator[TurnEvent, None], turn.run(TurnRequest(
            message=send.text, session_id=conversation_id or "", message_id=message_id)))
        try:
            try:
                started = await anext(events)
            except DuplicateMessage as duplicate:
                # Stored by a resend that raced this one (or whose session id was lost): the first
                # copy's seq, and no second answer.
                socket.current = duplicate.session_id
                socket.send({"type": "ack", "cid": send.cid, "seq": duplicate.seq, "duplicate": True})
                return
            except ApiError as error:
                if error.code == "not_found":
                    self._refuse(CLOSE_FORBIDDEN, "forbidden", "not your conversation")
                else:
                    socket.send(nack_frame("send", error.code, error.message, cid=send.cid,
                                           conversation_id=conversation_id))
                return
            assert isinstance(started, TurnStarted)
            conversation_id = started.session_id
            if conversation_id not in socket.conversations and not socket.closing:
                await hub.join(socket, principal, conversation_id, 0)  # new: replays this first message
            socket.current = conversation_id
            seq = await hub.find(principal, conversation_id, message_id, self._settings.rpc_timeout_s)
            socket.send({"type": "ack", "cid": send.cid, "seq": seq, "duplicate": False})
            async for event in events:
                if isinstance(event, TurnDelta):
                    feed = hub.feed(principal.tenant, conversation_id)
                    if feed is not None:
                        feed.broadcast({"type": "ai_delta", "conversation_id": conversation_id,
                                        "message_id": started.message_id, "delta": event.text})
        except StreamFailed as failure:
            socket.send(error_frame(failure.code, failure.message))
        except (NotYours, FeedUnavailable) as error:
            log.warning("socket lost its conversation feed mid-turn: %s", type(error).__name__)
        finally:
            await events.aclose()

    def _unsupported(self, frame: Unsupported) -> None:
        if frame.type in AGENT_TYPES:
            code, message = "forbidden", f"{frame.type} is for agents"
        else:
            code, message = "not_supported", f"{frame.type} is not supported by this edge yet"
        self._socket.send(nack_frame(frame.type, code, message, cid=frame.cid))
