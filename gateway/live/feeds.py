"""One feed per conversation per edge process, shared by its sockets: the conversation's stored events
and the live frames of every edge, fanned out to the Connections that follow it.

A feed reads the conversation's kept log once through the session service (as the edge
itself, an admin of the tenant, so it sees notes too), then follows the log in JetStream
(gateway/live/log.py), and the live frames of the other edges (one NATS subscription).
Each socket gets each stored event once (Connection.deliver); visitors never get notes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
import nats.errors

from gateway.auth import Principal
from gateway.bus import BusUnavailable
from gateway.clients import BackendClients, session_principal
from gateway.errors import FeedUnavailable, NotYours
from gateway.live.channels import LiveChannels, Route, conversation_subject, unsubscribe
from gateway.live.connection import Connection
from gateway.live.frames import (
    CLOSE_FORBIDDEN,
    ErrorFrame,
    LiveFrame,
    Resync,
    StateEvent,
    StoredEvent,
    relay,
    relayed,
    stored_event,
)
from gateway.live.log import LogFollower, LogTail
from gateway.live.tasks import BackgroundTasks
from gateway.metrics import EdgeMetrics
from gateway.settings import GatewaySettings
from kefu.session.v1 import session_pb2

log = logging.getLogger(__name__)

EDGE_SUBJECT = "kefu-edge"
"""The edge's own principal (an admin of the tenant) for the feeds: every event, notes included."""
BUFFER_EVENTS = 512
"""Newest stored events a feed keeps, so a socket joining later replays them from memory."""
"""A follower silent for this many heartbeat intervals has lost its consumer."""
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0

StateListener = Callable[["Feed", StateEvent], None]


def edge_principal(tenant: str) -> session_pb2.Principal:
    return session_pb2.Principal(tenant=tenant, subject=EDGE_SUBJECT, role="admin")


class Feed:
    """Stored events of one conversation from its log, plus live frames from other edges.

    `buffer` holds every event with seq > `floor`: a socket that joins with an `after_seq`
    >= `floor` gets its missed events from memory, older ones come from one ListMessages read.

    An edge holds one per followed conversation, mostly idle (issue 19: 100k on a machine), so it
    keeps plain lists, and no task, future or closure once it is following.
    """

    __slots__ = ("tenant", "conversation_id", "owner", "connections", "joining", "buffer", "floor", "last_seq",
                 "state", "ready", "task", "subscription", "follower", "_feeds", "_waiters", "_seq_by_id")

    def __init__(self, tenant: str, conversation_id: str, feeds: Feeds) -> None:
        self.tenant = tenant
        self.conversation_id = conversation_id
        self.owner: str | None = None
        """The visitor who owns it, once a visitor's access was checked."""
        self.connections: list[Connection] = []
        """The sockets following it (a list: a visitor's conversation has one or two)."""
        self.joining = 0
        """Joins in progress: they hold the feed open like a socket."""
        self.buffer: list[StoredEvent] = []
        self.floor = 0
        self.last_seq = 0
        self.state: StateEvent | None = None
        """The newest `state` event seen (None: still the state it was created with)."""
        self.ready: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
        """Done once the kept log is read; then None (joiners go straight on)."""
        self.task: asyncio.Task[None] | None = None
        """Reads the kept log and starts following; None once it has."""
        self.subscription: Route | None = None
        """Live frames from the other edges."""
        self.follower: LogFollower | None = None
        """The conversation's log in JetStream, from where the first read ended."""
        self._feeds = feeds
        self._waiters: dict[str, list[asyncio.Future[int]]] | None = None
        """Created by the first `wait_for` that has to wait."""
        self._seq_by_id: dict[str, int] = {}
        """Stored id -> seq of the events in `buffer` (state events carry no message_id in their frame)."""

    @property
    def status(self) -> str:
        return self.state.status if self.state else "ai"

    @property
    def version(self) -> int:
        return self.state.version if self.state else 1

    @property
    def holder(self) -> str:
        """The agent holding it ("" when none)."""
        return self.state.holder if self.state else ""

    def publish(self, message: session_pb2.Message) -> None:
        if message.seq <= self.last_seq:
            return  # already had it (the first read and the follower overlap)
        self.last_seq = message.seq
        event = stored_event(self.conversation_id, message, self.owner or "")
        if isinstance(event, StateEvent):
            self.state = event
        elif message.version and self.state is not None and message.version < self.version:
            # An AI reply generated before the state changed (an agent claimed meanwhile): void.
            self._wake(message.id, message.seq)
            return
        self.buffer.append(event)
        self._seq_by_id[message.id] = message.seq
        if len(self.buffer) > BUFFER_EVENTS:
            self.floor = self.buffer.pop(0).seq
            # dicts keep insertion order: the oldest id goes with the oldest event
            del self._seq_by_id[next(iter(self._seq_by_id))]
        for connection in list(self.connections):
            connection.deliver(event)
        if isinstance(event, StateEvent):
            self._feeds.state_changed(self, event)
        self._wake(message.id, message.seq)

    def from_other_edge(self, payload: dict[str, object]) -> None:
        """A payload another edge published on the conversation's subject: a live frame, or its deletion."""
        frame = relayed(payload.get("frame")) if "frame" in payload else None
        if frame is not None:
            self.deliver_live(frame)
        elif payload.get("deleted") is True:
            self._feeds.close_deleted(self)

    def deliver_live(self, frame: LiveFrame, origin: Connection | None = None) -> None:
        """A frame that is not stored (`ai_delta`, `typing`, `read`) to this process's sockets."""
        for connection in self.connections:
            if connection is not origin:
                connection.send(frame)

    async def wait_for(self, message_id: str, timeout_s: float) -> int | None:
        seq = self._seq_by_id.get(message_id)
        if seq is not None or timeout_s <= 0:
            return seq
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = {}
        self._waiters.setdefault(message_id, []).append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(message_id)
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[message_id]

    def _wake(self, message_id: str, seq: int) -> None:
        if not self._waiters:
            return
        for waiter in self._waiters.pop(message_id, []):
            if not waiter.done():
                waiter.set_result(seq)


class Feeds:
    """The feeds of this edge process, one per conversation some socket here follows."""

    def __init__(self, clients: BackendClients, settings: GatewaySettings, channels: LiveChannels,
                 tasks: BackgroundTasks, metrics: EdgeMetrics | None = None) -> None:
        self._clients = clients
        self._settings = settings
        self.channels = channels
        self._tasks = tasks
        self._metrics = metrics
        self._feeds: dict[tuple[str, str], Feed] = {}
        self._log_tail = LogTail(on_restart=self._count_restart)
        """The edge's one consumer of the conversation log, shared by every feed's follower (issue 19)."""
        self.state_listeners: list[StateListener] = []
        """Called after every stored `state` event a feed delivers (the desk reacts to it)."""
        channels.bus.reconnect_listeners.append(self._log_tail.reconnected)

    def feed(self, tenant: str, conversation_id: str) -> Feed | None:
        return self._feeds.get((tenant, conversation_id))

    def feeds_of(self, tenant: str) -> list[Feed]:
        return [feed for (feed_tenant, _), feed in self._feeds.items() if feed_tenant == tenant]

    async def join(self, connection: Connection, conversation_id: str, after_seq: int | None) -> int:
        """Subscribe `socket`: first its missed stored events (seq > after_seq) in order, then live
        ones; `after_seq` None subscribes from now on. Returns how many events were replayed.
        NotYours when the conversation is not the socket's to see."""
        principal = connection.principal
        assert principal is not None
        key = (principal.tenant, conversation_id)
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = Feed(principal.tenant, conversation_id, self)
            feed.task = asyncio.create_task(self._follow(feed))
        feed.joining += 1
        try:
            if feed.ready is not None:
                await asyncio.shield(feed.ready)
            if principal.role == "visitor":
                if feed.owner is None:
                    await self._history(principal, conversation_id)  # NotYours unless it is theirs
                    feed.owner = principal.subject
                elif feed.owner != principal.subject:
                    raise NotYours(conversation_id)
            backlog: list[StoredEvent] = []
            if after_seq is None:
                after_seq = feed.last_seq
            elif after_seq < feed.floor:
                history = await self._history(principal, conversation_id)
                merged = {m.seq: stored_event(conversation_id, m, feed.owner or "")
                          for m in history if m.seq > after_seq}
                merged.update({event.seq: event for event in feed.buffer})
                backlog = [merged[seq] for seq in sorted(merged)]
            else:
                backlog = [event for event in feed.buffer if event.seq > after_seq]
            # No await from here on: nothing published can fall between the backlog and the live part.
            connection.follow(conversation_id, after_seq, backlog)
            if connection not in feed.connections:
                feed.connections.append(connection)
            return len(backlog)
        finally:
            feed.joining -= 1
            self._close_if_unused(feed)

    def leave(self, connection: Connection, conversation_id: str) -> None:
        assert connection.principal is not None
        connection.unfollow(conversation_id)
        feed = self._feeds.get((connection.principal.tenant, conversation_id))
        if feed is not None:
            if connection in feed.connections:
                feed.connections.remove(connection)
            self._close_if_unused(feed)

    def leave_all(self, connection: Connection) -> None:
        for conversation_id in connection.conversations:
            self.leave(connection, conversation_id)

    def send_live(self, tenant: str, conversation_id: str, frame: LiveFrame,
                  origin: Connection | None = None) -> None:
        """A frame that is not stored to every socket of the conversation, on every edge."""
        feed = self._feeds.get((tenant, conversation_id))
        if feed is not None:
            feed.deliver_live(frame, origin)
        self._tasks.spawn(self.channels.publish(conversation_subject(tenant, conversation_id), {"frame": relay(frame)}))

    async def follow_and_find(self, connection: Connection, conversation_id: str, after_seq: int | None,
                              message_id: str, wait_s: float) -> int | None:
        """`join` unless the socket follows the conversation already (or is closing: it would hold the feed
        open), then `find` the message in it."""
        if not connection.follows(conversation_id) and not connection.closing:
            await self.join(connection, conversation_id, after_seq)
        assert connection.principal is not None
        return await self.find(connection.principal, conversation_id, message_id, wait_s)

    async def find(self, principal: Principal, conversation_id: str, message_id: str, wait_s: float) -> int | None:
        """Seq of a stored message of the conversation, or None: from the feed (waiting up to
        `wait_s` for it to arrive), else from one read when the feed does not hold everything."""
        feed = self._feeds.get((principal.tenant, conversation_id))
        if feed is not None:
            seq = await feed.wait_for(message_id, wait_s)
            if seq is not None or feed.floor == 0:
                return seq
        for message in await self._history(principal, conversation_id):
            if message.id == message_id:
                return int(message.seq)
        return None

    def deleted(self, tenant: str, conversation_id: str) -> None:
        """Its owner erased it: on every edge, the visitor's sockets are closed (4003), agents' sockets
        leave it with a `resync` (a reload finds nothing), and the feed goes."""
        feed = self._feeds.get((tenant, conversation_id))
        if feed is not None:
            self.close_deleted(feed)
        self._tasks.spawn(self.channels.publish(conversation_subject(tenant, conversation_id), {"deleted": True}))

    async def aclose(self) -> None:
        feeds = list(self._feeds.values())
        tasks = [f.task for f in feeds if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(unsubscribe(f.subscription) for f in feeds), return_exceptions=True)
        await asyncio.gather(*(f.follower.stop() for f in feeds if f.follower is not None),
                             return_exceptions=True)
        await self._log_tail.aclose()
        self._feeds.clear()

    def close_deleted(self, feed: Feed) -> None:
        for connection in list(feed.connections):
            connection.unfollow(feed.conversation_id)
            if connection.is_staff:
                connection.send(Resync(feed.conversation_id, "the conversation was deleted"))
            else:
                connection.send(ErrorFrame("not_found", "this conversation was deleted"))
                connection.close(CLOSE_FORBIDDEN, "conversation deleted")
        feed.connections.clear()
        self._drop(feed)

    def _count_restart(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.log_consumer_restarts.labels(reason).inc()

    def state_changed(self, feed: Feed, event: StateEvent) -> None:
        for listener in self.state_listeners:
            listener(feed, event)

    def _close_if_unused(self, feed: Feed) -> None:
        if feed.connections or feed.joining:
            return
        self._drop(feed)

    def _drop(self, feed: Feed) -> None:
        if self._feeds.get((feed.tenant, feed.conversation_id)) is feed:
            del self._feeds[(feed.tenant, feed.conversation_id)]
        if feed.task is not None:
            feed.task.cancel()
        if feed.subscription is not None:
            self._tasks.spawn(unsubscribe(feed.subscription))
            feed.subscription = None
        if feed.follower is not None:
            self._tasks.spawn(feed.follower.stop())
            feed.follower = None
            if self._metrics is not None:
                self._metrics.log_consumers.dec()
        # Nobody may be waiting on `ready` any more; do not let an unread exception be logged.
        if feed.ready is not None and feed.ready.done() and not feed.ready.cancelled():
            feed.ready.exception()

    async def _follow(self, feed: Feed) -> None:
        """Fill the feed with the kept log (one read, which also checks the conversation exists), then
        follow the log from its end in JetStream, and the other edges' live frames."""
        principal = edge_principal(feed.tenant)
        subject = conversation_subject(feed.tenant, feed.conversation_id)
        assert feed.ready is not None
        try:
            # The kept log in one read (a consumer would deliver it one message at a time), then
            # the log from its end: a cold feed answers a resume from memory once it is ready.
            for message in await self._read_log(principal, feed.conversation_id):
                if feed.owner is None and message.role == "user" and message.sender_id:
                    # Only the owner may speak as the visitor (the session service refuses anyone
                    # else): a visitor joining later is checked against this, without a read.
                    feed.owner = message.sender_id
                feed.publish(message)
        except (NotYours, FeedUnavailable) as failure:
            feed.ready.set_exception(failure)
            self._drop(feed)
            return
        # The buffer holds the whole kept log and the follower goes on from its end: joiners can
        # be served now (what the log brings later reaches them live).
        feed.ready.set_result(None)
        feed.ready = None
        delay = RETRY_MIN_S
        while feed.follower is None:
            try:
                nc = await self.channels.bus.connection(timeout_s=self._settings.rpc_timeout_s)
                follower = LogFollower(nc, feed.tenant, feed.conversation_id, feed.last_seq, feed.publish,
                                       tail=self._log_tail)
                await follower.start()
                feed.follower = follower
                if self._metrics is not None:
                    self._metrics.log_consumers.inc()
            except (BusUnavailable, nats.errors.Error, TimeoutError) as error:
                log.warning("following a conversation log failed (%s); retrying", str(error) or type(error).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        route = await self.channels.route(subject, feed.from_other_edge)
        if self._feeds.get((feed.tenant, feed.conversation_id)) is feed:
            feed.subscription = route
            feed.task = None  # done: nothing of it need stay with an idle conversation
        else:  # its last socket left meanwhile
            await unsubscribe(route)

    async def _history(self, principal: Principal, conversation_id: str) -> list[session_pb2.Message]:
        return await self._read_log(session_principal(principal), conversation_id)

    async def _read_log(self, principal: session_pb2.Principal, conversation_id: str) -> list[session_pb2.Message]:
        try:
            reply = await self._clients.session.ListMessages(session_pb2.ListMessagesRequest(
                principal=principal, session_id=conversation_id), timeout=self._settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                raise NotYours(conversation_id) from None
            raise FeedUnavailable(error.details() or str(error.code())) from None
        return list(reply.messages)
