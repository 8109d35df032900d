"""A socket's `hello`: who it is, whether it may chat, the conversations it resumes, and its `welcome`."""

from __future__ import annotations

import logging
import math

import grpc

from gateway.auth import LIVE_ROLES, Principal
from gateway.clients import session_principal
from gateway.errors import ApiError, FeedUnavailable, NotYours, SocketRefused
from gateway.live.connection import Connection
from gateway.live.context import SocketContext
from gateway.live.frames import (
    CLOSE_AUTH_FAILED,
    CLOSE_FORBIDDEN,
    CLOSE_RATE_LIMITED,
    CLOSE_SERVER_ERROR,
    Hello,
    ResumeResult,
    Resync,
    Welcome,
)
from gateway.live.service import DEFAULT_WELCOME_TEXT, LiveService
from kefu.session.v1 import session_pb2

log = logging.getLogger(__name__)

HELD_LIMIT = 50
"""Conversations an agent's socket follows on hello without naming them."""


async def greet(live: LiveService, connection: Connection, hello: Hello, principal: Principal | None,
                request_id: str) -> SocketContext:
    """Check the client, follow what it resumes, send `welcome` (then the replay); SocketRefused if not."""
    principal = await _admitted(live, hello, principal, connection.address)
    connection.greet(principal)
    live.metrics.ws_connections.labels(principal.role).inc()
    context = SocketContext(live, connection, principal, request_id)
    connection.hold()  # the welcome goes before any replayed event
    try:
        results = [await _resume(context, point.conversation_id, point.after_seq) for point in hello.points]
        if connection.is_staff:
            await _follow_held(context, {p.conversation_id for p in hello.points})
        elif not hello.points:
            await _open_conversation(context)
    except NotYours:
        connection.drop_held()
        raise SocketRefused(CLOSE_FORBIDDEN, "forbidden", "not your conversation") from None
    except FeedUnavailable as error:
        connection.drop_held()
        raise SocketRefused(CLOSE_SERVER_ERROR, "unavailable", f"session service unavailable: {error}") from None
    connection.release(await _welcome(context, tuple(results)))
    if connection.is_staff:
        live.desks.add_agent(connection)
    else:
        for conversation_id in connection.conversations:
            context.answer_if_owed(conversation_id)
    return context


async def _admitted(live: LiveService, hello: Hello, principal: Principal | None, address: str | None) -> Principal:
    """The principal of the header or of the hello's token, if it may use live chat now."""
    if principal is None:
        if hello.token is None:
            raise SocketRefused(CLOSE_AUTH_FAILED, "unauthorized", "send Authorization: Bearer or a token in hello")
        try:
            principal = live.verifier.verify(hello.token)
        except ApiError as error:
            raise SocketRefused(CLOSE_AUTH_FAILED, "unauthorized", error.message) from None
    if principal.role not in LIVE_ROLES:
        # An `api` integrator's token is for the chat and OpenAI endpoints; live chat is for people.
        raise SocketRefused(CLOSE_FORBIDDEN, "forbidden", f"role {principal.role!r} has no live chat")
    if live.blocked(principal, address):
        raise SocketRefused(CLOSE_FORBIDDEN, "blocked", "this visitor is blocked")
    if await live.account_disabled(principal):
        raise SocketRefused(CLOSE_AUTH_FAILED, "unauthorized", "this account is disabled")
    if principal.role == "visitor":
        settings = live.settings
        held_for = live.socket_holds.held_for(principal)
        if held_for:
            raise SocketRefused(CLOSE_RATE_LIMITED, "limit", f"too many frames; reconnect in {math.ceil(held_for)} s")
        if len(hello.points) > settings.visitor_max_conversations:
            raise SocketRefused(CLOSE_RATE_LIMITED, "limit", "a visitor's socket follows at most "
                                f"{settings.visitor_max_conversations} conversations")
        if not live.take_socket(principal):  # given back when the socket ends (gateway/handlers/ws.py)
            raise SocketRefused(CLOSE_RATE_LIMITED, "limit", f"at most {settings.visitor_max_sockets} "
                                "sockets per visitor")
    return principal


async def _resume(context: SocketContext, conversation_id: str, after_seq: int) -> ResumeResult:
    replayed = await context.feeds.join(context.connection, conversation_id, after_seq)
    context.live.metrics.resume_replayed.observe(replayed)
    if _beyond_retention(context, conversation_id, after_seq):
        context.connection.send(Resync(conversation_id,
                                       "events after after_seq are no longer kept; reload the history"))
        return ResumeResult(conversation_id, "resync")
    return ResumeResult(conversation_id, "ok")


def _beyond_retention(context: SocketContext, conversation_id: str, after_seq: int) -> bool:
    """The client's last seq is older than everything kept, and the kept history is full: events
    in between were dropped by the history bound."""
    feed = context.feeds.feed(context.principal.tenant, conversation_id)
    if feed is None or after_seq == 0 or not feed.buffer:
        return False
    return feed.buffer[0].seq > after_seq + 1 and len(feed.buffer) >= context.settings.max_history_messages


async def _welcome(context: SocketContext, results: tuple[ResumeResult, ...]) -> Welcome:
    connection, principal, live = context.connection, context.principal, context.live
    heartbeat_s, epoch = context.settings.ws_heartbeat_s, live.hub.epoch
    if connection.is_staff:
        return Welcome(principal.role, None, None, heartbeat_s, epoch, results)
    if results:
        connection.point_at(results[0].conversation_id)
    current = connection.current
    feed = context.feeds.feed(principal.tenant, current) if current else None
    greeting = await live.tenant_text(principal.tenant, "welcome", DEFAULT_WELCOME_TEXT)
    return Welcome(principal.role, current, feed.status if feed else "ai", heartbeat_s, epoch, results, greeting)


async def _open_conversation(context: SocketContext) -> None:
    """A visitor without `resume` continues its open conversation, if it has one."""
    try:
        reply = await context.live.clients.session.ListConversations(session_pb2.ListConversationsRequest(
            principal=session_principal(context.principal), limit=1), timeout=context.settings.rpc_timeout_s)
    except grpc.aio.AioRpcError as error:
        log.warning("open conversation of a visitor not found: %s", error.code())
        return
    if reply.conversations:
        conversation_id = reply.conversations[0].session_id
        await context.feeds.join(context.connection, conversation_id, 0)
        context.connection.point_at(conversation_id)


async def _follow_held(context: SocketContext, already: set[str]) -> None:
    """An agent's socket follows the conversations it holds."""
    principal = context.principal
    try:
        reply = await context.live.clients.session.ListConversations(session_pb2.ListConversationsRequest(
            principal=session_principal(principal), status="human", assignee=principal.subject,
            limit=HELD_LIMIT), timeout=context.settings.rpc_timeout_s)
    except grpc.aio.AioRpcError as error:
        log.warning("held conversations of an agent not listed: %s", error.code())
        return
    for conversation in reply.conversations:
        if conversation.session_id not in already:
            await context.feeds.join(context.connection, conversation.session_id, 0)
