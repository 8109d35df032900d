"""The dialogue of one WebSocket: hello, then its frames handled one after the other, in order."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator
from typing import Any, cast

import grpc
from aiohttp import WSMsgType

from gateway.auth import LIVE_ROLES, Principal, bearer_token
from gateway.chat_turn import (
    SUPERSEDED,
    ChatTurn,
    DuplicateMessage,
    StreamFailed,
    TurnDelta,
    TurnDone,
    TurnEvent,
    TurnRequest,
    TurnStarted,
    checked_input,
)
from gateway.clients import session_principal
from gateway.errors import LIMIT_CODES, ApiError, api_error_from_grpc
from gateway.live.connection import Connection
from gateway.live.frames import (
    AGENT_TYPES,
    CLOSE_AUTH_FAILED,
    CLOSE_BAD_FRAMES,
    CLOSE_FORBIDDEN,
    CLOSE_RATE_LIMITED,
    MAX_FRAME_BYTES,
    Claim,
    ClientFrame,
    Close,
    FrameError,
    Handoff,
    Hello,
    Note,
    Ping,
    Presence,
    Read,
    Release,
    Send,
    Transfer,
    Typing,
    error_frame,
    message_id_for,
    nack_frame,
    parse_frame,
)
from gateway.live.hub import FeedUnavailable, NotYours
from gateway.live.owed import AnswerLease, answer_owed, owed_message
from gateway.live.service import DEFAULT_WELCOME_TEXT, LiveService, Refused
from kefu.session.v1 import session_pb2

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
"""A socket that has not said `hello` by then is closed (4001)."""
MAX_BAD_FRAMES = 3
FLOOD_HOLD_S = 10.0
"""A visitor closed for a frame flood (4008) gets no new socket on this edge for this long."""
HELD_LIMIT = 50
"""Conversations an agent's socket follows on hello without naming them."""


class LiveSocket:
    def __init__(self, live: LiveService, socket: Connection, authorization: str | None, request_id: str) -> None:
        self._live = live
        self._settings = live.settings
        self._socket = socket
        self._hub = live.hub
        self._authorization = authorization
        """The upgrade request's Authorization header, if any (browsers send their token in hello)."""
        self._request_id = request_id
        self._bad_frames = 0
        self._counted: Principal | None = None
        """The visitor whose socket count this socket holds (released when it ends)."""

    @property
    def _principal(self) -> Principal:
        assert self._socket.principal is not None
        return self._socket.principal

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._counted is not None:
                self._live.release_socket(self._counted)

    async def _run(self) -> None:
        socket, ws = self._socket, self._socket.ws
        header_principal: Principal | None = None
        if self._authorization is not None:
            try:
                header_principal = self._live.verifier.verify(bearer_token(self._authorization))
            except ApiError as error:
                self._refuse(CLOSE_AUTH_FAILED, "unauthorized", error.message)
                return
        greeted = False
        socket.reader = asyncio.current_task()
        while not socket.closing:
            try:
                socket.receiving = True
                message = await ws.receive(timeout=None if greeted else HELLO_TIMEOUT_S)
            except TimeoutError:
                self._refuse(CLOSE_AUTH_FAILED, "unauthorized", "no hello frame")
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if socket.closing and task is not None:  # our own close stopped the read
                    task.uncancel()
                    return
                raise
            finally:
                socket.receiving = False
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return  # aiohttp already answered a close, or closed an oversized frame with 1009
            if not socket.take_frame_token(self._settings.ws_frame_rps, self._settings.ws_frame_burst):
                if socket.principal is not None and socket.principal.role == "visitor":
                    self._live.socket_holds.hold(socket.principal, FLOOD_HOLD_S)
                self._refuse(CLOSE_RATE_LIMITED, "rate_limited", "too many frames")
                return
            try:
                if message.type is not WSMsgType.TEXT:
                    raise FrameError("invalid_frame", "frames are JSON text")
                frame = parse_frame(message.data, max_text_chars=self._settings.max_message_chars)
                self._live.metrics.ws_messages.labels("in", type(frame).__name__.lower()).inc()
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
            else:
                await self._handle(frame)

    async def _handle(self, frame: ClientFrame) -> None:
        socket = self._socket
        kind = type(frame).__name__.lower()
        if kind in AGENT_TYPES and not socket.is_staff:
            cid = getattr(frame, "cid", None)
            socket.send(nack_frame(kind, "forbidden", f"{kind} is for agents", cid=cid,
                                   conversation_id=getattr(frame, "conversation_id", None)))
            return
        try:
            match frame:
                case Ping():
                    socket.send({"type": "pong"})
                case Send():
                    if socket.is_staff:
                        await self._agent_send(frame)
                    else:
                        await self._visitor_send(frame)
                case Typing():
                    self._require_joined(frame.conversation_id)
                    self._hub.send_live(self._principal.tenant, frame.conversation_id, {
                        "type": "typing", "conversation_id": frame.conversation_id, "on": frame.on,
                        "sender": self._sender()}, origin=socket)
                case Read():
                    self._require_joined(frame.conversation_id)
                    self._hub.send_live(self._principal.tenant, frame.conversation_id, {
                        "type": "read", "conversation_id": frame.conversation_id, "up_to_seq": frame.up_to_seq,
                        "reader": self._sender()}, origin=socket)
                case Handoff():
                    await self._ensure_joined(frame.conversation_id)
                    reason = "visitor" if not socket.is_staff else "rule"
                    reply = await self._live.hand_off(self._principal, frame.conversation_id, reason)
                    await self._echoed(frame.conversation_id, reply.event.id)
                    self._ack(frame.cid, reply.event.seq)
                case Claim():
                    principal = self._principal
                    reply = await self._live.transition(principal, frame.conversation_id, "claim",
                                                        assignee_name=principal.name or principal.subject)
                    await self._hub.join(socket, frame.conversation_id, 0)
                    self._live.desks.announce(principal.tenant, {
                        "kind": "assigned", "conversation_id": frame.conversation_id, "agent": principal.subject})
                    await self._echoed(frame.conversation_id, reply.event.id)
                    self._ack(frame.cid, reply.event.seq)
                case Release():
                    action = "release_ai" if frame.to == "ai" else "release_queue"
                    await self._let_go(frame.conversation_id, frame.cid, action, reason="release")
                case Transfer():
                    await self._let_go(frame.conversation_id, frame.cid, "transfer", reason="transfer",
                                       assignee=frame.agent)
                    self._live.desks.announce(self._principal.tenant, {
                        "kind": "assigned", "conversation_id": frame.conversation_id, "agent": frame.agent})
                case Close():
                    await self._let_go(frame.conversation_id, frame.cid, "close", reason="close")
                case Note():
                    await self._note(frame)
                case Presence():
                    self._live.desks.set_presence(socket, frame.status)
        except Refused as refused:
            socket.send(nack_frame(kind, refused.code, refused.message, cid=getattr(frame, "cid", None),
                                   conversation_id=getattr(frame, "conversation_id", None)))
        except NotYours:
            if socket.is_staff:
                socket.send(nack_frame(kind, "forbidden", "no such conversation in your tenant",
                                       cid=getattr(frame, "cid", None),
                                       conversation_id=getattr(frame, "conversation_id", None)))
            else:
                self._refuse(CLOSE_FORBIDDEN, "forbidden", "not your conversation")
        except FeedUnavailable as error:
            socket.send(nack_frame(kind, "unavailable", str(error), cid=getattr(frame, "cid", None),
                                   conversation_id=getattr(frame, "conversation_id", None)))

    async def _let_go(self, conversation_id: str, cid: str | None, action: str, *, reason: str,
                      assignee: str = "") -> None:
        """Release, transfer or close: the agent who held it stops following it, on every edge."""
        principal = self._principal
        feed = self._hub.feed(principal.tenant, conversation_id)
        previous = str(feed.state.get("assignee", "")) if feed is not None and feed.state else principal.subject
        reply = await self._live.transition(principal, conversation_id, action, reason=reason, assignee=assignee)
        if conversation_id in self._socket.conversations:
            await self._echoed(conversation_id, reply.event.id)
        self._ack(cid, reply.event.seq)
        if previous and previous != assignee:
            self._live.desks.announce(principal.tenant, {
                "kind": "unassigned", "conversation_id": conversation_id, "agent": previous})

    # -- hello -----------------------------------------------------------------------------

    async def _hello(self, hello: Hello, principal: Principal | None) -> bool:
        live, socket = self._live, self._socket
        if principal is None:
            if hello.token is None:
                self._refuse(CLOSE_AUTH_FAILED, "unauthorized", "send Authorization: Bearer or a token in hello")
                return False
            try:
                principal = live.verifier.verify(hello.token)
            except ApiError as error:
                self._refuse(CLOSE_AUTH_FAILED, "unauthorized", error.message)
                return False
        if principal.role not in LIVE_ROLES:
            # An `api` integrator's token is for the chat and OpenAI endpoints; live chat is for people.
            self._refuse(CLOSE_FORBIDDEN, "forbidden", f"role {principal.role!r} has no live chat")
            return False
        if live.blocked(principal, socket.address):
            self._refuse(CLOSE_FORBIDDEN, "blocked", "this visitor is blocked")
            return False
        if await live.account_disabled(principal):
            self._refuse(CLOSE_AUTH_FAILED, "unauthorized", "this account is disabled")
            return False
        if principal.role == "visitor":
            held_for = live.socket_holds.held_for(principal)
            if held_for:
                self._refuse(CLOSE_RATE_LIMITED, "limit", f"too many frames; reconnect in {math.ceil(held_for)} s")
                return False
            if len(hello.resume) > self._settings.visitor_max_conversations:
                self._refuse(CLOSE_RATE_LIMITED, "limit", f"a visitor's socket follows at most "
                             f"{self._settings.visitor_max_conversations} conversations")
                return False
            if not live.take_socket(principal):
                self._refuse(CLOSE_RATE_LIMITED, "limit", f"at most {self._settings.visitor_max_sockets} "
                             "sockets per visitor")
                return False
            self._counted = principal
        socket.principal = principal
        live.metrics.ws_connections.labels(principal.role).inc()
        socket.hold()  # the welcome goes before any replayed event
        results: list[dict[str, Any]] = []
        try:
            for point in hello.resume:
                replayed = await self._hub.join(socket, point.conversation_id, point.after_seq)
                live.metrics.resume_replayed.observe(replayed)
                result = "resync" if self._beyond_retention(point.conversation_id, point.after_seq) else "ok"
                if result == "resync":
                    socket.send({"type": "resync", "conversation_id": point.conversation_id,
                                 "reason": "events after after_seq are no longer kept; reload the history"})
                results.append({"conversation_id": point.conversation_id, "result": result})
            if socket.is_staff:
                await self._follow_held({p.conversation_id for p in hello.resume})
            elif not hello.resume:
                await self._open_conversation()
        except NotYours:
            socket.drop_held()
            self._refuse(CLOSE_FORBIDDEN, "forbidden", "not your conversation")
            return False
        except FeedUnavailable as error:
            socket.drop_held()
            self._refuse(1011, "unavailable", f"session service unavailable: {error}")
            return False
        welcome: dict[str, Any] = {"type": "welcome", "role": principal.role,
                                   "heartbeat_s": self._settings.ws_heartbeat_s, "epoch": self._hub.epoch,
                                   "resume": results}
        if socket.is_staff:
            welcome.update(conversation_id=None, status=None)
        else:
            socket.current = hello.resume[0].conversation_id if hello.resume else socket.current
            feed = self._hub.feed(principal.tenant, socket.current) if socket.current else None
            welcome.update(conversation_id=socket.current, status=feed.status if feed else "ai",
                           greeting=await live.tenant_text(principal.tenant, "welcome", DEFAULT_WELCOME_TEXT))
        socket.release(welcome)
        if socket.is_staff:
            live.desks.add_agent(socket)
        else:
            for conversation_id in socket.conversations:
                self._answer_if_owed(conversation_id)
        return True

    def _beyond_retention(self, conversation_id: str, after_seq: int) -> bool:
        """The client's last seq is older than everything kept, and the kept history is full: events
        in between were dropped by the history bound."""
        feed = self._hub.feed(self._principal.tenant, conversation_id)
        if feed is None or after_seq == 0 or not feed.buffer:
            return False
        return feed.buffer[0]["seq"] > after_seq + 1 and len(feed.buffer) >= self._settings.max_history_messages

    async def _open_conversation(self) -> None:
        """A visitor without `resume` continues its open conversation, if it has one."""
        try:
            reply = await self._live.clients.session.ListConversations(session_pb2.ListConversationsRequest(
                principal=session_principal(self._principal), limit=1), timeout=self._settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            log.warning("open conversation of a visitor not found: %s", error.code())
            return
        if reply.conversations:
            conversation_id = reply.conversations[0].session_id
            await self._hub.join(self._socket, conversation_id, 0)
            self._socket.current = conversation_id

    async def _follow_held(self, already: set[str]) -> None:
        """An agent's socket follows the conversations it holds."""
        principal = self._principal
        try:
            reply = await self._live.clients.session.ListConversations(session_pb2.ListConversationsRequest(
                principal=session_principal(principal), status="human", assignee=principal.subject,
                limit=HELD_LIMIT), timeout=self._settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            log.warning("held conversations of an agent not listed: %s", error.code())
            return
        for conversation in reply.conversations:
            if conversation.session_id not in already:
                await self._hub.join(self._socket, conversation.session_id, 0)

    # -- visitor ---------------------------------------------------------------------------

    async def _visitor_send(self, send: Send) -> None:
        socket, principal = self._socket, self._principal
        held_for = self._live.message_holds.held_for(principal)
        if held_for:
            raise Refused("limit", f"too many messages; retry in {math.ceil(held_for)} s")
        message_id = message_id_for(principal.tenant, principal.subject, send.cid)
        socket.remember_cid(message_id, send.cid)
        conversation_id = send.conversation_id or socket.current
        if conversation_id is None and len(socket.conversations) >= self._settings.visitor_max_conversations:
            raise Refused("limit", f"this socket follows {len(socket.conversations)} conversations already")
        if conversation_id is not None:
            await self._ensure_joined(conversation_id)
            seq = await self._hub.find(principal, conversation_id, message_id, 0)
            if seq is not None:
                # Stored before (a retry): the same seq again, and no second answer, unless the first
                # one was cut off (its edge died while it streamed).
                self._ack(send.cid, seq, duplicate=True)
                self._answer_if_owed(conversation_id)
                return
        # The turn runs in the hub: the answer is generated and stored even if this socket
        # drops meanwhile; this socket's next frame waits for it (frames are handled in order).
        await asyncio.shield(self._hub.spawn(self._turn(conversation_id, send, message_id)))

    async def _turn(self, conversation_id: str | None, send: Send, message_id: str) -> None:
        state = self._live.state
        state.open_streams += 1  # a draining edge lets the answer finish and be stored
        try:
            await self._run_turn(conversation_id, send, message_id)
        finally:
            state.open_streams -= 1

    async def _run_turn(self, conversation_id: str | None, send: Send, message_id: str) -> None:
        socket, hub, principal = self._socket, self._hub, self._principal
        wants_human = self._live.handoff_rules.asks_for_human(send.text)
        turn = ChatTurn(self._live.clients, self._settings, principal, self._request_id, self._live.tenant_settings)
        lease: AnswerLease | None = None
        # run() is an async generator (typed as an iterator): close it to end its gRPC streams.
        events = cast(AsyncGenerator[TurnEvent, None], turn.run(TurnRequest(
            message=send.text, session_id=conversation_id or "", message_id=message_id, answer=not wants_human)))
        try:
            try:
                started = await anext(events)
            except DuplicateMessage as duplicate:
                # Stored by a resend that raced this one (or whose conversation id was lost).
                socket.current = duplicate.session_id
                self._ack(send.cid, duplicate.seq, duplicate=True)
                self._answer_if_owed(duplicate.session_id)
                return
            except ApiError as error:
                if error.code == "not_found":
                    self._refuse(CLOSE_FORBIDDEN, "forbidden", "not your conversation")
                else:
                    if error.code == "rate_limited":
                        self._live.message_holds.hold(principal, float(error.headers.get("Retry-After", "1")))
                    socket.send(nack_frame("send", nack_code(error.code), error.message, cid=send.cid,
                                           conversation_id=conversation_id))
                return
            assert isinstance(started, TurnStarted)
            conversation_id = started.session_id
            if conversation_id not in socket.conversations and not socket.closing:
                await hub.join(socket, conversation_id, 0)  # new: replays this first message
            socket.current = conversation_id
            seq = await hub.find(principal, conversation_id, message_id, self._settings.rpc_timeout_s)
            self._ack(send.cid, seq)
            version = started.state.version if started.state is not None else 0
            if wants_human and started.state is not None and started.state.status == "ai":
                await self._hand_off_quietly(conversation_id, "keyword", version)
            if started.answering:
                # Kept while the answer streams: should this edge die, another answers on the visitor's return.
                lease = AnswerLease(self._live.clients, self._settings, principal, conversation_id, message_id, "")
                lease.keep()
            async for event in events:
                if lease is not None and lease.lost.is_set():
                    log.warning("an answer's lease went to another edge: this one stops")
                    break
                feed = hub.feed(principal.tenant, conversation_id)
                if isinstance(event, TurnDelta):
                    if feed is not None and version and feed.version > version:
                        continue  # an agent took over: the rest of this answer is never shown
                    hub.send_live(principal.tenant, conversation_id, {
                        "type": "ai_delta", "conversation_id": conversation_id,
                        "message_id": started.message_id, "delta": event.text})
                elif isinstance(event, TurnDone) and event.finish_reason == "handoff":
                    # The knowledge base had no answer: a human should take it.
                    await self._hand_off_quietly(conversation_id, "no_answer", version)
                elif isinstance(event, TurnDone) and event.finish_reason == SUPERSEDED:
                    log.info("an AI answer was dropped: the conversation changed state meanwhile")
        except StreamFailed as failure:
            socket.send(error_frame(failure.code, failure.message))
        except (NotYours, FeedUnavailable) as error:
            log.warning("socket lost its conversation feed mid-turn: %s", type(error).__name__)
        finally:
            await events.aclose()
            if lease is not None:
                await lease.release()

    async def _hand_off_quietly(self, conversation_id: str, reason: str, version: int) -> None:
        try:
            await self._live.hand_off(self._principal, conversation_id, reason, expected_version=version)
        except Refused as refused:  # someone changed it first: nothing to do
            log.info("automatic handoff not applied: %s", refused.code)

    # -- agents ----------------------------------------------------------------------------

    async def _agent_send(self, send: Send) -> None:
        socket, principal = self._socket, self._principal
        if send.conversation_id is None:
            raise Refused("invalid_request", "conversation_id is required for agents")
        conversation_id = send.conversation_id
        await self._ensure_joined(conversation_id)
        if not self._live.holds(socket, self._hub.feed(principal.tenant, conversation_id)):
            raise Refused("not_assigned", "claim the conversation before replying")
        message_id = message_id_for(principal.tenant, principal.subject, send.cid)
        socket.remember_cid(message_id, send.cid)
        text = await self._moderated(send.text)
        appended = await self._append(conversation_id, text, message_id, kind="message")
        await self._echoed(conversation_id, message_id)
        self._ack(send.cid, appended.message.seq, duplicate=appended.duplicate)

    async def _note(self, note: Note) -> None:
        socket, principal = self._socket, self._principal
        await self._ensure_joined(note.conversation_id)
        message_id = message_id_for(principal.tenant, principal.subject, note.cid)
        socket.remember_cid(message_id, note.cid)
        appended = await self._append(note.conversation_id, note.text, message_id, kind="note")
        await self._echoed(note.conversation_id, message_id)
        self._ack(note.cid, appended.message.seq, duplicate=appended.duplicate)

    async def _echoed(self, conversation_id: str, message_id: str) -> None:
        """Wait (bounded) until the stored event reached this socket's feed: the echo comes before
        the ack, as for visitors, and the feed's view of the state is current for the next frame."""
        if message_id:
            await self._hub.find(self._principal, conversation_id, message_id, self._settings.rpc_timeout_s)

    async def _append(self, conversation_id: str, text: str, message_id: str,
                      kind: str) -> session_pb2.AppendResponse:
        principal = self._principal
        try:
            reply: session_pb2.AppendResponse = await self._live.clients.session.Append(session_pb2.AppendRequest(
                principal=session_principal(principal), session_id=conversation_id, role="agent", content=text,
                message_id=message_id, kind=kind, sender_name=principal.name or principal.subject),
                timeout=self._settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            api_error = api_error_from_grpc(error, "session")
            raise Refused(nack_code(api_error.code), api_error.message) from None
        return reply

    async def _moderated(self, text: str) -> str:
        try:
            return await checked_input(self._live.clients, self._settings, self._principal.tenant, text)
        except ApiError as error:  # content_blocked, or moderation unreachable (fail closed)
            raise Refused(error.code, error.message) from None

    # -- helpers ---------------------------------------------------------------------------

    async def _ensure_joined(self, conversation_id: str) -> None:
        socket = self._socket
        if conversation_id not in socket.conversations:
            if not socket.is_staff and len(socket.conversations) >= self._settings.visitor_max_conversations:
                raise Refused("limit", f"this socket follows {len(socket.conversations)} conversations already")
            await self._hub.join(socket, conversation_id, None)

    def _require_joined(self, conversation_id: str) -> None:
        if conversation_id not in self._socket.conversations:
            raise Refused("forbidden", "not subscribed to this conversation")

    def _sender(self) -> dict[str, str]:
        principal = self._principal
        sender = {"type": "agent" if self._socket.is_staff else "visitor", "id": principal.subject}
        if principal.name:
            sender["name"] = principal.name
        return sender

    def _answer_if_owed(self, conversation_id: str) -> None:
        """A visitor message without its answer (an edge died while it streamed): answer it, once."""
        if owed_message(self._hub.feed(self._principal.tenant, conversation_id)) is not None:
            self._hub.spawn(answer_owed(self._hub, self._live.clients, self._settings, self._principal,
                                        conversation_id, self._request_id, self._live.tenant_settings))

    def _ack(self, cid: str | None, seq: int | None, *, duplicate: bool = False) -> None:
        frame: dict[str, Any] = {"type": "ack", "cid": cid, "seq": seq or 0, "duplicate": duplicate}
        self._socket.send(frame)

    def _refuse(self, code: int, error_code: str, message: str) -> None:
        self._socket.send(error_frame(error_code, message))
        self._socket.close(code, message[:100])

    def _bad_frame(self, error: FrameError) -> None:
        self._bad_frames += 1
        self._socket.send(error_frame(error.code, error.message))
        if self._bad_frames >= MAX_BAD_FRAMES:
            self._socket.close(CLOSE_BAD_FRAMES, "too many bad frames")


def nack_code(code: str) -> str:
    """A limit the visitor or its tenant hit is nacked `limit` (its message says which)."""
    return "limit" if code in LIMIT_CODES else code


__all__ = ["LiveSocket", "MAX_FRAME_BYTES"]
