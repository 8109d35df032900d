"""Frames that are not stored (ai_delta, typing, read, queue pokes) between edge processes, over core NATS.

Stored events reach every edge through the conversation's JetStream log (gateway/live/log.py);
these do not need the log, only the other edges that hold sockets of the conversation
or agents of the tenant. An edge publishes with its own id and ignores what it sent
itself: it delivers to its own sockets directly, in order with the rest of its frames.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from typing import Any, cast

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.bus import BusUnavailable, EdgeBus

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "kefu.live"


def conversation_subject(tenant: str, conversation_id: str) -> str:
    return f"{SUBJECT_PREFIX}.{tenant}.c.{conversation_id}"


def desk_subject(tenant: str) -> str:
    """The agents' desk of a tenant: queue changes, assignments, presence."""
    return f"{SUBJECT_PREFIX}.{tenant}.desk"


Handler = Callable[[dict[str, Any]], None]


class LiveChannels:
    def __init__(self, bus: EdgeBus) -> None:
        self.bus = bus
        self.edge_id = secrets.token_hex(6)
        """This process among the edges: its own publications come back and are skipped."""

    async def publish(self, subject: str, payload: dict[str, Any]) -> None:
        """Best effort: a frame that is not stored may be lost when NATS is away (the next one follows)."""
        try:
            await self.bus.nc.publish(subject, json.dumps({**payload, "origin": self.edge_id}).encode())
        except (BusUnavailable, nats.errors.Error) as error:
            log.debug("live publish on %s skipped: %s", subject, error)

    async def subscribe(self, subject: str, handler: Handler) -> Subscription | None:
        """Call `handler` with every payload other edges publish on `subject`; None without NATS."""

        async def deliver(message: Msg) -> None:
            self.from_other_edge(message.data, handler)

        try:
            nc = await self.bus.connection(timeout_s=2.0)
            return await nc.subscribe(subject, cb=deliver)
        except (BusUnavailable, nats.errors.Error) as error:
            log.warning("live subscription to %s failed: %s", subject, error)
            return None

    async def route(self, subject: str, handler: Handler) -> Route | None:
        """Like `subscribe`, for the many per-conversation subjects: the server still sends a conversation's
        frames only to the edges that follow it, but here they are handed to `handler` right where the
        connection reads them, with no task nor queue per subject (see Route); None without NATS."""
        try:
            nc = await self.bus.connection(timeout_s=2.0)
            return await Route.add(nc, subject, self, handler)
        except (BusUnavailable, nats.errors.Error) as error:
            log.warning("live subscription to %s failed: %s", subject, error)
            return None

    def from_other_edge(self, data: bytes, handler: Handler) -> None:
        """Hand `handler` a payload another edge published (this edge's own come back too: skipped)."""
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if isinstance(payload, dict) and payload.get("origin") != self.edge_id:
            handler(payload)


class Route:
    """One subject's interest on the NATS connection, delivered by a plain call instead of nats-py's
    Subscription (an asyncio.Queue and a task each: at 10k followed conversations ~4 KiB apiece, issue 19).

    nats-py (pinned in pyproject.toml) keeps its subscriptions in `Client._subs` by sid: it hands each
    message to `sub._pending_queue.put_nowait` and replays every entry's `_subject` after a reconnect.
    A Route is such an entry whose queue is itself, so the message is dispatched at once, in order, from
    the connection's read loop. tests/gateway/test_live_routes.py holds nats-py to that (routing,
    unsubscribe, reconnect replay) so that an upgrade changing it fails there first.
    """

    __slots__ = ("_conn", "_id", "_subject", "_queue", "_max_msgs", "_received", "_jsi", "_future",
                 "_pending_size", "_pending_bytes_limit", "_pending_next_msgs_calls", "_wait_for_msgs_task",
                 "_message_iterator", "_closed", "_channels", "_handler")

    def __init__(self, nc: NatsClient, sid: int, subject: str, channels: LiveChannels, handler: Handler) -> None:
        self._conn = nc
        self._id = sid
        self._subject = subject
        self._queue = ""
        self._max_msgs = 0
        self._received = 0
        self._jsi = None
        self._future = None
        self._pending_size = 0
        self._pending_bytes_limit = 0
        """0: nats-py's slow-consumer check is off (nothing is ever pending here)."""
        self._pending_next_msgs_calls = None
        self._wait_for_msgs_task = None
        self._message_iterator = None
        self._closed = False
        self._channels = channels
        self._handler = handler
        """Called with each payload of another edge (a conversation's feed: no closure per route)."""

    @classmethod
    async def add(cls, nc: NatsClient, subject: str, channels: LiveChannels, handler: Handler) -> Route:
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        nc._sid += 1
        route = cls(nc, nc._sid, subject, channels, handler)
        _subscriptions(nc)[route._id] = route
        try:
            await nc._send_subscribe(cast(Subscription, route))
        except BaseException:
            route._closed = True  # cancelled, or NATS went away: nothing is delivered to it
            _subscriptions(nc).pop(route._id, None)
            raise
        return route

    @property
    def subject(self) -> str:
        return self._subject

    @property
    def _pending_queue(self) -> Route:
        return self

    def put_nowait(self, message: Msg) -> None:
        """nats-py's hand-over: the message is for this edge's followers now (their sends never block)."""
        self._pending_size = 0
        try:
            self._channels.from_other_edge(message.data, self._handler)
        except Exception:  # the connection's read loop must go on for every other subject
            log.exception("live frame on %s not delivered", self._subject)

    async def _drain(self) -> None:
        """nats-py's `Client.drain` (an edge's shutdown) drains every entry of `_subs`: nothing is pending
        here, so only the server's interest goes (and the flush makes sure it has)."""
        try:
            if not self._closed:
                await self._conn._send_unsubscribe(self._id)
                await self._conn.flush()
        finally:
            self._closed = True
            _subscriptions(self._conn).pop(self._id, None)

    async def remove(self) -> None:
        """The server stops sending it; nothing is dispatched after this call."""
        if self._closed:
            return
        self._closed = True
        nc = self._conn
        if _subscriptions(nc).get(self._id) is self:
            del _subscriptions(nc)[self._id]
        if not (nc.is_closed or nc.is_reconnecting or nc.is_draining):
            await nc._send_unsubscribe(self._id)


def _subscriptions(nc: NatsClient) -> dict[int, object]:
    return cast("dict[int, object]", nc._subs)


def count_routes(nc: NatsClient) -> int:
    """Routes registered on the connection (tests: the last follower leaving removes its conversation's)."""
    return sum(1 for entry in _subscriptions(nc).values() if isinstance(entry, Route))


async def unsubscribe(subscription: Subscription | Route | None) -> None:
    if subscription is None:
        return
    try:
        if isinstance(subscription, Route):
            await subscription.remove()
        else:
            await subscription.unsubscribe()
    except (nats.errors.Error, ConnectionError):
        pass


