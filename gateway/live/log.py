"""Following a conversation's log in JetStream straight from the edge.

The session service writes the log (after its access and state checks); an edge only reads
it, as the tenant's staff would: every event, notes included. Which socket may see which
event (no notes for visitors, no void AI replies) the feed decides, as the session does for
its own readers. Reading the log here rather than through a session gRPC stream saves a gRPC
stream message per event and edge: the session's CPU went to relaying events it had just
stored. All followers of an edge share one consumer (gateway/live/log_tail.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient

from gateway.live.log_tail import HEARTBEAT_S, INACTIVE_S, LogTail
from kefu.session.v1 import session_pb2
from services.common.conversation_log import log_subject

log = logging.getLogger(__name__)

CITATION_FIELDS = ("document_id", "title", "url", "chunk_id", "quote")

__all__ = ["HEARTBEAT_S", "INACTIVE_S", "LogFollower", "LogTail", "decode_event"]


def decode_event(data: bytes, seq: int) -> session_pb2.Message:
    """One stored record of the log (the session's JSON form) as the session API's Message."""
    raw: dict[str, Any] = json.loads(data)
    message = session_pb2.Message(
        id=raw["id"], role=raw["role"], content=raw["content"], created_at=float(raw["created_at"]),
        tokens=int(raw["tokens"]), seq=seq, kind=str(raw.get("kind", "message")),
        sender_id=str(raw.get("sender_id", "")), sender_name=str(raw.get("sender_name", "")),
        version=int(raw.get("version", 0)),
        citations=[session_pb2.Citation(**{name: str(c.get(name, "")) for name in CITATION_FIELDS})
                   for c in raw.get("citations", ())])
    state = raw.get("state")
    if state:
        message.state.CopyFrom(session_pb2.ConversationState(
            status=str(state["status"]), version=int(state["version"]), assignee=str(state.get("assignee", "")),
            assignee_name=str(state.get("assignee_name", "")), reason=str(state.get("reason", "")),
            since=float(state.get("since", 0.0))))
    return message


class LogFollower:
    """One conversation's log from a seq on: each event once, in order, then each new one.

    Given the edge's shared `tail` (gateway/live/log_tail.py), a follower is a dict entry
    there: no consumer, subscription, task or heartbeat of its own. Without one it keeps a
    private tail filtered on its conversation (a consumer of its own, as before issue 19):
    for a single follower, not for an edge.
    """

    __slots__ = ("_nc", "_tail", "_own_tail", "subject", "_on_event", "last_seq")

    def __init__(self, nc: NatsClient, tenant: str, conversation_id: str, after_seq: int,
                 on_event: Callable[[session_pb2.Message], None], *, tail: LogTail | None = None,
                 heartbeat_s: float = HEARTBEAT_S, inactive_s: float = INACTIVE_S,
                 on_restart: Callable[[str], None] | None = None) -> None:
        self._nc = nc
        self.subject = log_subject(tenant, conversation_id)
        self._own_tail = tail is None
        self._tail = tail if tail is not None else LogTail(
            filter_subject=self.subject, heartbeat_s=heartbeat_s, inactive_s=inactive_s, on_restart=on_restart)
        self._on_event = on_event
        self.last_seq = after_seq
        """Stream seq of the newest event delivered (or the start point)."""

    @property
    def silent_s(self) -> float:
        """Seconds since the (shared) consumer last delivered an event or a heartbeat."""
        return self._tail.silent_s

    @property
    def heartbeat_s(self) -> float:
        return self._tail.heartbeat_s

    @property
    def restarts(self) -> int:
        """Restarts of the consumer behind this follower (shared: everyone's)."""
        return self._tail.restarts

    async def start(self) -> None:
        """Deliver what came after `last_seq`, then follow; NATS errors propagate (the caller retries)."""
        await self._tail.follow(self._nc, self, self.last_seq)

    def restart(self, reason: str) -> None:
        """Recreate the consumer from the last seq it handled: once for every follower of a shared tail.
        `reason`: gap, reconnect or silent."""
        self._tail.restart(reason)

    async def stop(self) -> None:
        self._tail.unfollow(self)
        if self._own_tail:
            await self._tail.aclose()

    def receive(self, seq: int, data: bytes) -> None:
        """One stored event of the conversation from the tail (or the catch-up read)."""
        if seq <= self.last_seq:
            return  # the catch-up read and the tail overlap
        try:
            event = decode_event(data, seq)
        except (ValueError, KeyError, TypeError):
            log.warning("conversation log: undecodable event at seq %d skipped", seq)
            event = None
        self.last_seq = seq
        if event is not None:
            self._on_event(event)
