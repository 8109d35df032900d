"""What an agent's (or admin's) frames do: reply (`send`), `claim`, `release`, `transfer`, `close`, `note`,
`presence`."""

from __future__ import annotations

import grpc

from gateway.chat_turn import checked_input
from gateway.clients import session_principal
from gateway.errors import ApiError, Refused, api_error_from_grpc
from gateway.live.context import SocketContext
from gateway.live.frames import AgentFrame, Claim, Close, Note, Presence, Release, Send, Transfer, message_id_for
from kefu.session.v1 import session_pb2


async def handle(context: SocketContext, frame: AgentFrame) -> None:
    match frame:
        case Claim():
            await claim(context, frame)
        case Release():
            action = "release_ai" if frame.to == "ai" else "release_queue"
            await _let_go(context, frame.conversation_id, frame.cid, action, reason="release")
        case Transfer():
            await _let_go(context, frame.conversation_id, frame.cid, "transfer", reason="transfer",
                          assignee=frame.agent)
            context.live.desks.announce(context.principal.tenant, {
                "kind": "assigned", "conversation_id": frame.conversation_id, "agent": frame.agent})
        case Close():
            await _let_go(context, frame.conversation_id, frame.cid, "close", reason="close")
        case Note():
            await context.ensure_joined(frame.conversation_id)
            await _store(context, frame.conversation_id, frame.cid, frame.text, kind="note")
        case Presence():
            context.live.desks.set_presence(context.connection, frame.status)


async def send(context: SocketContext, frame: Send) -> None:
    """An agent's reply in a conversation it holds, moderated like a visitor's message."""
    if frame.conversation_id is None:
        raise Refused("invalid_request", "conversation_id is required for agents")
    conversation_id = frame.conversation_id
    await context.ensure_joined(conversation_id)
    if not context.live.holds(context.connection, context.feeds.feed(context.principal.tenant, conversation_id)):
        raise Refused("not_assigned", "claim the conversation before replying")
    try:
        text = await checked_input(context.live.clients, context.settings, context.principal.tenant, frame.text,
                                   context.request_id)
    except ApiError as error:  # content_blocked, or moderation unreachable (fail closed)
        raise Refused(error.code, error.message) from None
    await _store(context, conversation_id, frame.cid, text, kind="message")


async def claim(context: SocketContext, frame: Claim) -> None:
    principal = context.principal
    reply = await context.live.transition(principal, frame.conversation_id, "claim",
                                          assignee_name=principal.name or principal.subject)
    await context.feeds.join(context.connection, frame.conversation_id, 0)
    context.live.desks.announce(principal.tenant, {
        "kind": "assigned", "conversation_id": frame.conversation_id, "agent": principal.subject})
    await context.echoed(frame.conversation_id, reply.event.id)
    context.ack(frame.cid, reply.event.seq)


async def _let_go(context: SocketContext, conversation_id: str, cid: str | None, action: str, *, reason: str,
                  assignee: str = "") -> None:
    """Release, transfer or close: the agent who held it stops following it, on every edge."""
    principal = context.principal
    feed = context.feeds.feed(principal.tenant, conversation_id)
    previous = feed.holder if feed is not None and feed.state else principal.subject
    reply = await context.live.transition(principal, conversation_id, action, reason=reason, assignee=assignee)
    if context.connection.follows(conversation_id):
        await context.echoed(conversation_id, reply.event.id)
    context.ack(cid, reply.event.seq)
    if previous and previous != assignee:
        context.live.desks.announce(principal.tenant, {
            "kind": "unassigned", "conversation_id": conversation_id, "agent": previous})


async def _store(context: SocketContext, conversation_id: str, cid: str, text: str, *, kind: str) -> None:
    """Append the agent's message or note; the socket sees its echo (with its cid), then the ack."""
    principal = context.principal
    message_id = message_id_for(principal.tenant, principal.subject, cid)
    context.connection.remember_cid(message_id, cid)
    try:
        # Over the session call stream (gateway/call_streams.py): the live path's hot call.
        reply = await context.live.clients.calls.append(session_pb2.AppendRequest(
            principal=session_principal(principal), session_id=conversation_id, role="agent", content=text,
            message_id=message_id, kind=kind, sender_name=principal.name or principal.subject),
            context.settings.rpc_timeout_s, context.request_id)
    except grpc.aio.AioRpcError as error:
        raise api_error_from_grpc(error, "session") from None
    await context.echoed(conversation_id, message_id)
    context.ack(cid, reply.message.seq, duplicate=reply.duplicate)
