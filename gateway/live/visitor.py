"""What a visitor's frames do: `send` (a chat turn: stored, answered by the AI, streamed), and the frames
visitors and agents share: `typing`, `read` and `handoff`."""

from __future__ import annotations

import asyncio
import logging
import math

from gateway.chat_turn import (
    SUPERSEDED,
    ChatTurn,
    DuplicateMessage,
    StreamFailed,
    TurnDelta,
    TurnDone,
    TurnRequest,
    TurnStarted,
)
from gateway.errors import ApiError, FeedUnavailable, NotYours, Refused
from gateway.live.context import SocketContext
from gateway.live.frames import (
    Ack,
    AiDelta,
    ErrorFrame,
    Handoff,
    Read,
    ReadEvent,
    Send,
    Typing,
    TypingEvent,
    message_id_for,
)
from gateway.live.owed import AnswerLease

log = logging.getLogger(__name__)


async def send(context: SocketContext, frame: Send) -> None:
    """Store the visitor's message and stream the AI's answer; the ack comes once it is stored."""
    connection, principal = context.connection, context.principal
    held_for = context.live.message_holds.held_for(principal)
    if held_for:
        raise Refused("limit", f"too many messages; retry in {math.ceil(held_for)} s")
    message_id = message_id_for(principal.tenant, principal.subject, frame.cid)
    connection.remember_cid(message_id, frame.cid)
    conversation_id = frame.conversation_id or connection.current
    followed = len(connection.conversations)
    if (conversation_id is None or not connection.follows(conversation_id)) \
            and followed >= context.settings.visitor_max_conversations:
        raise Refused("limit", f"this socket follows {followed} conversations already")
    if conversation_id is not None:
        seq = await context.feeds.follow_and_find(connection, conversation_id, None, message_id, 0)
        if seq is not None:
            # Stored before (a retry): the same seq again, and no second answer, unless the first
            # one was cut off (its edge died while it streamed).
            connection.send(Ack(frame.cid, seq, True))
            context.answer_if_owed(conversation_id)
            return
    # The turn runs in the hub: the answer is generated and stored even if this socket
    # drops meanwhile; this socket's next frame waits for it (frames are handled in order).
    await asyncio.shield(context.live.hub.spawn(_turn(context, conversation_id, frame, message_id)))


def typing(context: SocketContext, frame: Typing) -> None:
    context.require_joined(frame.conversation_id)
    context.feeds.send_live(context.principal.tenant, frame.conversation_id,
                            TypingEvent(frame.conversation_id, frame.on, context.peer()), origin=context.connection)


def read(context: SocketContext, frame: Read) -> None:
    context.require_joined(frame.conversation_id)
    event = ReadEvent(frame.conversation_id, frame.up_to_seq, context.peer())
    context.feeds.send_live(context.principal.tenant, frame.conversation_id, event, origin=context.connection)


async def handoff(context: SocketContext, frame: Handoff) -> None:
    await context.ensure_joined(frame.conversation_id)
    reason = "rule" if context.connection.is_staff else "visitor"
    reply = await context.live.hand_off(context.principal, frame.conversation_id, reason)
    await context.echoed(frame.conversation_id, reply.event.id)
    context.ack(frame.cid, reply.event.seq)


async def _turn(context: SocketContext, conversation_id: str | None, frame: Send, message_id: str) -> None:
    state = context.live.state
    with state.streaming():  # a draining edge lets the answer finish and be stored
        await _run_turn(context, conversation_id, frame, message_id)


async def _run_turn(context: SocketContext, conversation_id: str | None, frame: Send, message_id: str) -> None:
    live, connection, principal, feeds = context.live, context.connection, context.principal, context.feeds
    wants_human = live.handoff_rules.asks_for_human(frame.text)
    turn = ChatTurn(live.clients, live.settings, principal, context.request_id, live.tenant_settings)
    lease: AnswerLease | None = None
    # run() is an async generator (typed as an iterator): close it to end its gRPC streams.
    events = turn.run(TurnRequest(
        message=frame.text, session_id=conversation_id or "", message_id=message_id, answer=not wants_human))
    try:
        try:
            started = await anext(events)
        except DuplicateMessage as duplicate:
            # Stored by a resend that raced this one (or whose conversation id was lost).
            connection.point_at(duplicate.session_id)
            context.ack(frame.cid, duplicate.seq, duplicate=True)
            context.answer_if_owed(duplicate.session_id)
            return
        except ApiError as error:
            if error.code == "not_found":
                error = NotYours(conversation_id or "")
            elif error.code == "rate_limited":
                live.message_holds.hold(principal, float(error.headers.get("Retry-After", "1")))
            context.fail("send", error, cid=frame.cid, conversation_id=conversation_id)
            return
        assert isinstance(started, TurnStarted)
        conversation_id = started.session_id
        connection.point_at(conversation_id)
        # A new conversation is followed from its start (this first message is replayed to the socket).
        seq = await feeds.follow_and_find(connection, conversation_id, 0, message_id, context.settings.rpc_timeout_s)
        connection.send(Ack(frame.cid, seq or 0))
        version = started.state.version if started.state is not None else 0
        if wants_human and started.state is not None and started.state.status == "ai":
            await _hand_off_quietly(context, conversation_id, "keyword", version)
        if started.answering:
            # Kept while the answer streams: should this edge die, another answers on the visitor's return.
            lease = AnswerLease(live.clients, live.settings, principal, conversation_id, message_id, "")
            lease.keep()
        async for event in events:
            if lease is not None and lease.lost.is_set():
                log.warning("an answer's lease went to another edge: this one stops")
                break
            feed = feeds.feed(principal.tenant, conversation_id)
            if isinstance(event, TurnDelta):
                if feed is not None and version and feed.version > version:
                    continue  # an agent took over: the rest of this answer is never shown
                feeds.send_live(principal.tenant, conversation_id,
                                AiDelta(conversation_id, started.message_id, event.text))
            elif isinstance(event, TurnDone) and event.finish_reason == "handoff":
                # The knowledge base had no answer: a human should take it.
                await _hand_off_quietly(context, conversation_id, "no_answer", version)
            elif isinstance(event, TurnDone) and event.finish_reason == SUPERSEDED:
                log.info("an AI answer was dropped: the conversation changed state meanwhile")
    except StreamFailed as failure:
        connection.send(ErrorFrame(failure.code, failure.message))
    except (NotYours, FeedUnavailable) as error:
        log.warning("socket lost its conversation feed mid-turn: %s", type(error).__name__)
    finally:
        await events.aclose()
        if lease is not None:
            await lease.release()


async def _hand_off_quietly(context: SocketContext, conversation_id: str, reason: str, version: int) -> None:
    try:
        await context.live.hand_off(context.principal, conversation_id, reason, expected_version=version)
    except Refused as refused:  # someone changed it first: nothing to do
        log.info("automatic handoff not applied: %s", refused.code)
