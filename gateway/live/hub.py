"""The sockets of one edge process and one feed per conversation, shared by its sockets.

A feed reads the conversation's kept log once through the session service (as the edge
itself, an admin of the tenant, so it sees notes too), then follows the log in JetStream
(gateway/live/log.py), and the live frames of the other edges (one NATS subscription).
Each socket gets each stored event once: its `seen` seq per conversation makes replay and
live delivery overlap safely. Visitors never get notes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import nats.errors
from nats.aio.subscription import Subscription

from gateway.auth import Principal
from gateway.bus import BusUnavailable, EdgeBus
from gateway.clients import BackendClients, session_principal
from gateway.live.channels import LiveChannels, conversation_subject, unsubscribe
from gateway.live.connection import Connection
from gateway.live.frames import CLOSE_FORBIDDEN, event_frame
from gateway.live.log import LogFollower, LogTail
from gateway.metrics import EdgeMetrics
from gateway.settings import GatewaySettings
from kefu.session.v1 import session_pb2

log = logging.getLogger(__name__)

EDGE_SUBJECT = "kefu-edge"
"""The edge's own principal (an admin of the tenant) for the feeds: every event, notes included."""
BUFFER_EVENTS = 512
"""Newest stored events a feed keeps, so a socket joining later replays them from memory."""
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0


class NotYours(Exception):
    """The conversation does not exist or is not the principal's (close 4003 / nack forbidden)."""


class FeedUnavailable(Exception):
    """The session service could not be asked (close 1011: try again)."""


def edge_principal(tenant: str) -> session_pb2.Principal:
    return session_pb2.Principal(tenant=tenant, subject=EDGE_SUBJECT, role="admin")


class Feed:
    """Stored events of one conversation from its log, plus live frames from other edges.

    `buffer` holds every event with seq > `floor`: a socket that joins with an `after_seq`
    >= `floor` gets its missed events from memory, older ones come from one ListMessages read.
    """

    def __init__(self, tenant: str, conversation_id: str, on_state: Callable[[Feed, dict[str, Any]], None]) -> None:
        self.tenant = tenant
        self.conversation_id = conversation_id
        self.owner: str | None = None
        """The visitor who owns it, once a visitor's access was checked."""
        self.sockets: set[Connection] = set()
        self.joining = 0
        """Joins in progress: they hold the feed open like a socket."""
        self.buffer: deque[dict[str, Any]] = deque()
        self.floor = 0
        self.last_seq = 0
        self.state: dict[str, Any] | None = None
        """The newest `state` event seen (None: still the state it was created with)."""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self.subscription: Subscription | None = None
        """Live frames from the other edges."""
        self.follower: LogFollower | None = None
        """The conversation's log in JetStream, from where the first read ended."""
        self._on_state = on_state
        self._waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._seq_by_id: dict[str, int] = {}
        """Stored id -> seq of the events in `buffer` (state events carry no message_id in their frame)."""

    @property
    def status(self) -> str:
        return str(self.state["status"]) if self.state else "ai"

    @property
    def version(self) -> int:
        return int(self.state["version"]) if self.state else 1

    def publish(self, message: session_pb2.Message) -> None:
        if message.seq <= self.last_seq:
            return  # already had it (the first read and the follower overlap)
        self.last_seq = message.seq
        frame = event_frame(self.conversation_id, message, self.owner or "")
        if frame["type"] == "state":
            self.state = frame
        elif message.version and self.state is not None and message.version < self.version:
            # An AI reply generated before the state changed (an agent claimed meanwhile): void.
            self._wake(message.id, message.seq)
            return
        self.buffer.append(frame)
        self._seq_by_id[message.id] = message.seq
        if len(self.buffer) > BUFFER_EVENTS:
            self.floor = self.buffer.popleft()["seq"]
            # dicts keep insertion order: the oldest id goes with the oldest event
            del self._seq_by_id[next(iter(self._seq_by_id))]
        for socket in list(self.sockets):
            deliver_stored(socket, frame)
        if frame["type"] == "state":
            self._on_state(self, frame)
        self._wake(message.id, message.seq)

    def deliver_live(self, frame: dict[str, Any], origin: Connection | None = None) -> None:
        """A frame that is not stored (`ai_delta`, `typing`, `read`) to this process's sockets."""
        for socket in self.sockets:
            if socket is not origin and (socket.is_staff or not frame.get("staff_only")):
                socket.send(frame)

    def seq_in_buffer(self, message_id: str) -> int | None:
        return self._seq_by_id.get(message_id)

    async def wait_for(self, message_id: str, timeout_s: float) -> int | None:
        seq = self.seq_in_buffer(message_id)
        if seq is not None or timeout_s <= 0:
            return seq
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
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
        for waiter in self._waiters.pop(message_id, []):
            if not waiter.done():
                waiter.set_result(seq)


def deliver_stored(socket: Connection, frame: dict[str, Any], *, replay: bool = False) -> None:
    if frame["type"] == "note" and not socket.is_staff:
        return  # private notes never reach a visitor socket
    socket.send_stored(frame, replay=replay)


class LiveHub:
    """Every open socket of this edge process, and the conversation feeds they share."""

    def __init__(self, clients: BackendClients, settings: GatewaySettings, bus: EdgeBus,
                 metrics: EdgeMetrics | None = None) -> None:
        self._clients = clients
        self._settings = settings
        self.channels = LiveChannels(bus)
        self.epoch = int(time.time() * 1000)
        """This process's start (ms): a client that sees it change knows it reached another edge."""
        self.connections: set[Connection] = set()
        self._feeds: dict[tuple[str, str], Feed] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.state_listeners: list[Callable[[Feed, dict[str, Any]], None]] = []
        """Called after every stored `state` event a feed delivers (the desk reacts to it)."""
        self._metrics = metrics
        self._log_tail = LogTail(on_restart=self._count_restart)
        """The edge's one consumer on the conversation log, shared by every feed's follower (issue 19)."""
        bus.reconnect_listeners.append(self._log_tail.reconnected)

    def feed(self, tenant: str, conversation_id: str) -> Feed | None:
        return self._feeds.get((tenant, conversation_id))

    def feeds_of(self, tenant: str) -> list[Feed]:
        return [feed for (feed_tenant, _), feed in self._feeds.items() if feed_tenant == tenant]

    async def join(self, socket: Connection, conversation_id: str, after_seq: int | None) -> int:
        """Subscribe `socket`: first its missed stored events (seq > after_seq) in order, then live
        ones; `after_seq` None subscribes from now on. Returns how many events were replayed.
        NotYours when the conversation is not the socket's to see."""
        principal = socket.principal
        assert principal is not None
        key = (principal.tenant, conversation_id)
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = Feed(principal.tenant, conversation_id, self._state_changed)
            feed.task = asyncio.create_task(self._follow(feed))
        feed.joining += 1
        try:
            await asyncio.shield(feed.ready)
            if principal.role == "visitor":
                if feed.owner is None:
                    await self._history(principal, conversation_id)  # NotYours unless it is theirs
                    feed.owner = principal.subject
                elif feed.owner != principal.subject:
                    raise NotYours(conversation_id)
            backlog: list[dict[str, Any]] = []
            if after_seq is None:
                socket.seen[conversation_id] = max(socket.seen.get(conversation_id, 0), feed.last_seq)
            else:
                socket.seen[conversation_id] = max(socket.seen.get(conversation_id, 0), after_seq)
                if after_seq < feed.floor:
                    history = await self._history(principal, conversation_id)
                    merged = {m.seq: event_frame(conversation_id, m, feed.owner or "")
                              for m in history if m.seq > after_seq}
                    merged.update({f["seq"]: f for f in feed.buffer})
                    backlog = [merged[seq] for seq in sorted(merged)]
                else:
                    backlog = [f for f in feed.buffer if f["seq"] > after_seq]
            # No await from here on: nothing published can fall between the backlog and the live part.
            for frame in backlog:
                deliver_stored(socket, frame, replay=True)
            feed.sockets.add(socket)
            socket.conversations.add(conversation_id)
            return len(backlog)
        finally:
            feed.joining -= 1
            self._close_if_unused(feed)

    def leave(self, socket: Connection, conversation_id: str) -> None:
        assert socket.principal is not None
        socket.conversations.discard(conversation_id)
        feed = self._feeds.get((socket.principal.tenant, conversation_id))
        if feed is not None:
            feed.sockets.discard(socket)
            self._close_if_unused(feed)

    def leave_all(self, socket: Connection) -> None:
        for conversation_id in list(socket.conversations):
            self.leave(socket, conversation_id)

    def send_live(self, tenant: str, conversation_id: str, frame: dict[str, Any],
                  origin: Connection | None = None) -> None:
        """A frame that is not stored to every socket of the conversation, on every edge."""
        feed = self._feeds.get((tenant, conversation_id))
        if feed is not None:
            feed.deliver_live(frame, origin)
        self.spawn(self.channels.publish(conversation_subject(tenant, conversation_id), {"frame": frame}))

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

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run work that must outlive the socket that asked for it (an AI answer is stored anyway)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def close_all(self, code: int, reason: str) -> None:
        for socket in list(self.connections):
            socket.close(code, reason)

    async def aclose(self) -> None:
        feeds = list(self._feeds.values())
        tasks = [*self._tasks, *(f.task for f in feeds if f.task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(unsubscribe(f.subscription) for f in feeds), return_exceptions=True)
        await asyncio.gather(*(f.follower.stop() for f in feeds if f.follower is not None),
                             return_exceptions=True)
        await self._log_tail.aclose()
        self._feeds.clear()

    def conversation_deleted(self, tenant: str, conversation_id: str) -> None:
        """Its owner erased it: on every edge, the visitor's sockets are closed (4003), agents' sockets
        leave it with a `resync` (a reload finds nothing), and the feed goes."""
        feed = self._feeds.get((tenant, conversation_id))
        if feed is not None:
            self._close_deleted(feed)
        self.spawn(self.channels.publish(conversation_subject(tenant, conversation_id), {"deleted": True}))

    def _close_deleted(self, feed: Feed) -> None:
        for socket in list(feed.sockets):
            socket.conversations.discard(feed.conversation_id)
            if socket.is_staff:
                socket.send({"type": "resync", "conversation_id": feed.conversation_id,
                             "reason": "the conversation was deleted"})
            else:
                socket.send({"type": "error", "code": "not_found", "message": "this conversation was deleted"})
                socket.close(CLOSE_FORBIDDEN, "conversation deleted")
        feed.sockets.clear()
        self._drop(feed)

    def _count_restart(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.log_consumer_restarts.labels(reason).inc()

    def _state_changed(self, feed: Feed, frame: dict[str, Any]) -> None:
        for listener in self.state_listeners:
            listener(feed, frame)

    def _close_if_unused(self, feed: Feed) -> None:
        if feed.sockets or feed.joining:
            return
        self._drop(feed)

    def _drop(self, feed: Feed) -> None:
        if self._feeds.get((feed.tenant, feed.conversation_id)) is feed:
            del self._feeds[(feed.tenant, feed.conversation_id)]
        if feed.task is not None:
            feed.task.cancel()
        if feed.subscription is not None:
            self.spawn(unsubscribe(feed.subscription))
            feed.subscription = None
        if feed.follower is not None:
            self.spawn(feed.follower.stop())
            feed.follower = None
            if self._metrics is not None:
                self._metrics.log_consumers.dec()
        # Nobody may be waiting on `ready` any more; do not let an unread exception be logged.
        if feed.ready.done() and not feed.ready.cancelled():
            feed.ready.exception()

    async def _follow(self, feed: Feed) -> None:
        """Fill the feed with the kept log (one read, which also checks the conversation exists), then
        follow the log from its end in JetStream, and the other edges' live frames."""
        principal = edge_principal(feed.tenant)
        subject = conversation_subject(feed.tenant, feed.conversation_id)

        def from_other_edge(payload: dict[str, Any]) -> None:
            frame = payload.get("frame")
            if isinstance(frame, dict):
                feed.deliver_live(frame)
            elif payload.get("deleted") is True:
                self._close_deleted(feed)

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
        feed.subscription = await self.channels.subscribe(subject, from_other_edge)

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
