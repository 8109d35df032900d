"""Following a conversation's log in JetStream straight from the edge.

The session service writes the log (after its access and state checks); an edge only reads
it, as the tenant's staff would: every event, notes included. Which socket may see which
event (no notes for visitors, no void AI replies) the feed decides, as the session does for
its own readers. Reading the log here rather than through a session gRPC stream saves a gRPC
stream message per event and edge: the session's CPU went to relaying events it had just
stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from kefu.session.v1 import session_pb2
from services.common.conversation_log import LOG_STREAM, log_subject

log = logging.getLogger(__name__)

CITATION_FIELDS = ("document_id", "title", "url", "chunk_id", "quote")

HEARTBEAT_S = 10.0
"""The server's idle heartbeat of each consumer: how soon a lost consumer is noticed (at 3 missed)."""
INACTIVE_S = 30.0
"""The server deletes a consumer nobody listens to after this long (an edge that died)."""


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

    A push consumer in memory on the server, without acks or flow control, delivering to
    one subscription. nats-py's ordered consumer would do the same, but it keeps two
    polling tasks per consumer (one wakes every 0.25 s), which at a few hundred open
    conversations cost an edge several percent of a core with nothing happening. Here a
    gap in the consumer's own sequence, a reconnect (`restart`) or a consumer silent for
    longer than its heartbeats (`silent_s`, checked by the hub) recreates it from the last
    seq delivered, so nothing falls out and nothing comes twice.
    """

    def __init__(self, nc: NatsClient, tenant: str, conversation_id: str, after_seq: int,
                 on_event: Callable[[session_pb2.Message], None], *,
                 heartbeat_s: float = HEARTBEAT_S, inactive_s: float = INACTIVE_S,
                 on_restart: Callable[[str], None] | None = None) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._subject = log_subject(tenant, conversation_id)
        self._on_event = on_event
        self._heartbeat_s = heartbeat_s
        self._inactive_s = inactive_s
        self.last_seq = after_seq
        """Stream seq of the newest event delivered (or the start point)."""
        self._delivered = 0
        """The current consumer's sequence of the last message it delivered."""
        self._subscription: Subscription | None = None
        self._consumer = ""
        self._heard = time.monotonic()
        self._restarting: asyncio.Task[None] | None = None
        self._on_restart = on_restart
        """Told why each restart happens (a metric)."""
        self.restarts = 0

    @property
    def silent_s(self) -> float:
        """Seconds since the consumer last delivered an event or a heartbeat."""
        return time.monotonic() - self._heard

    @property
    def heartbeat_s(self) -> float:
        return self._heartbeat_s

    async def start(self) -> None:
        """Create the consumer from `last_seq` on; NATS errors propagate (the caller retries)."""
        inbox = self._nc.new_inbox()
        self._delivered = 0
        # Current before the consumer exists: its first deliveries may come before add_consumer returns.
        subscription = self._subscription = await self._nc.subscribe(inbox, cb=self._deliver)
        config = ConsumerConfig(
            deliver_subject=inbox, filter_subject=self._subject, ack_policy=AckPolicy.NONE, mem_storage=True,
            num_replicas=1, idle_heartbeat=self._heartbeat_s, inactive_threshold=self._inactive_s,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self.last_seq else DeliverPolicy.ALL,
            opt_start_seq=self.last_seq + 1 if self.last_seq else None)
        try:
            info = await self._js.add_consumer(LOG_STREAM, config)
        except BaseException:
            self._subscription = None
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
            raise
        self._consumer = info.name
        self._heard = time.monotonic()

    def restart(self, reason: str) -> None:
        """Recreate the consumer from the last seq delivered (in the background; once at a time).
        `reason`: gap, reconnect or silent."""
        if self._restarting is None or self._restarting.done():
            if self._on_restart is not None:
                self._on_restart(reason)
            self._restarting = asyncio.create_task(self._restart())

    async def _restart(self) -> None:
        self.restarts += 1
        await self._drop_consumer()
        delay = 0.2
        while True:
            try:
                await self.start()
                return
            except (nats.errors.Error, TimeoutError) as error:
                log.warning("conversation log: consumer not recreated (%s); retrying",
                            str(error) or type(error).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def stop(self) -> None:
        if self._restarting is not None and not self._restarting.done():
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        await self._drop_consumer()

    async def _drop_consumer(self) -> None:
        subscription, consumer = self._subscription, self._consumer
        self._subscription, self._consumer = None, ""
        if subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        if consumer:
            # Now rather than after the server's inactivity timer.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._js.delete_consumer(LOG_STREAM, consumer)

    async def _deliver(self, raw: Msg) -> None:
        if self._subscription is None or raw.sid != self._subscription._id:
            return  # from a consumer already replaced
        self._heard = time.monotonic()
        headers = raw.headers
        if headers and "Status" in headers:
            # An idle heartbeat says how far the consumer got: behind that is a gap.
            last = headers.get("Nats-Last-Consumer")
            if last is not None and int(last) != self._delivered:
                self.restart("gap")
            return
        sequence = raw.metadata.sequence
        if sequence.consumer != self._delivered + 1:
            self.restart("gap")  # a message fell out (slow consumer, reconnect): read again from last_seq
            return
        self._delivered = sequence.consumer
        if sequence.stream <= self.last_seq:
            return
        try:
            event = decode_event(raw.data, sequence.stream)
        except (ValueError, KeyError, TypeError):
            log.warning("conversation log: undecodable event at seq %d skipped", sequence.stream)
            event = None
        self.last_seq = sequence.stream
        if event is not None:
            self._on_event(event)
