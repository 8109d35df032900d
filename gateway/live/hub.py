"""The sockets of one edge process and one session Watch per conversation, shared by its sockets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import grpc

from gateway.auth import Principal
from gateway.clients import BackendClients
from gateway.live.connection import Connection
from gateway.live.frames import msg_frame
from gateway.settings import GatewaySettings
from kefu.session.v1 import session_pb2

log = logging.getLogger(__name__)

WATCH_READY_HEADER = "kefu-watch"
"""Initial metadata the session service sends once a Watch passed its access check."""
BUFFER_EVENTS = 256
"""Newest stored events a feed keeps, so a socket joining later replays them from memory."""
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0


class NotYours(Exception):
    """The conversation does not exist or is not the principal's (close 4003)."""


class FeedUnavailable(Exception):
    """The session service could not be asked (close 1011: try again)."""


class Feed:
    """Stored events of one conversation from one Watch: sent to each subscribed socket once, in order.

    `buffer` holds every event with seq > `floor`, so a socket that joins with an
    `after_seq` >= `floor` gets its missed events from memory, and older ones come from
    one ListMessages read.
    """

    def __init__(self, tenant: str, conversation_id: str, owner: str, after_seq: int) -> None:
        self.tenant = tenant
        self.conversation_id = conversation_id
        self.owner = owner
        self.sockets: set[Connection] = set()
        self.joining = 0
        """Joins in progress: they hold the feed open like a socket."""
        self.buffer: deque[dict[str, Any]] = deque()
        self.floor = after_seq
        self.last_seq = after_seq
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[asyncio.Future[int]]] = {}

    def publish(self, message: session_pb2.Message) -> None:
        if message.seq <= self.last_seq:
            return  # replayed again after a Watch was restarted
        self.last_seq = message.seq
        frame = msg_frame(self.conversation_id, message, self.owner)
        self.buffer.append(frame)
        if len(self.buffer) > BUFFER_EVENTS:
            self.floor = self.buffer.popleft()["seq"]
        for socket in self.sockets:
            socket.send(frame)
        for waiter in self._waiters.pop(message.id, []):
            if not waiter.done():
                waiter.set_result(message.seq)

    def broadcast(self, frame: dict[str, Any]) -> None:
        """A frame that is not stored (`ai_delta`) to this process's sockets of the conversation."""
        for socket in self.sockets:
            socket.send(frame)

    def seq_in_buffer(self, message_id: str) -> int | None:
        for frame in reversed(self.buffer):
            if frame["message_id"] == message_id:
                return int(frame["seq"])
        return None

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


class LiveHub:
    """Every open socket of this edge process, and the conversation feeds they share."""

    def __init__(self, clients: BackendClients, settings: GatewaySettings) -> None:
        self._clients = clients
        self._settings = settings
        self.epoch = int(time.time() * 1000)
        """This process's start (ms): a client that sees it change knows it reached another edge."""
        self.connections: set[Connection] = set()
        self._feeds: dict[tuple[str, str], Feed] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def feed(self, tenant: str, conversation_id: str) -> Feed | None:
        return self._feeds.get((tenant, conversation_id))

    async def join(self, socket: Connection, principal: Principal, conversation_id: str,
                   after_seq: int | None) -> None:
        """Subscribe `socket`: first its missed events (seq > after_seq) in order, then live ones.
        `after_seq` None subscribes from now on. NotYours when it is not the principal's."""
        key = (principal.tenant, conversation_id)
        feed = self._feeds.get(key)
        if feed is None:
            start = after_seq if after_seq is not None else await self._last_seq(principal, conversation_id)
            feed = self._feeds.get(key)  # someone else may have opened it meanwhile
            if feed is None:
                feed = self._feeds[key] = Feed(principal.tenant, conversation_id, principal.subject, start)
                feed.task = asyncio.create_task(self._follow(feed, principal))
        feed.joining += 1
        try:
            await asyncio.shield(feed.ready)
            if feed.owner != principal.subject:
                raise NotYours(conversation_id)
            backlog: list[dict[str, Any]] = []
            if after_seq is not None and after_seq < feed.floor:
                history = await self._history(principal, conversation_id)
                merged = {m.seq: msg_frame(conversation_id, m, feed.owner) for m in history if m.seq > after_seq}
                merged.update({f["seq"]: f for f in feed.buffer})
                backlog = [merged[seq] for seq in sorted(merged)]
            elif after_seq is not None:
                backlog = [f for f in feed.buffer if f["seq"] > after_seq]
            # No await from here on: nothing published can fall between the backlog and the live part.
            for frame in backlog:
                socket.send(frame)
            feed.sockets.add(socket)
            socket.conversations.add(conversation_id)
        finally:
            feed.joining -= 1
            self._close_if_unused(feed)

    def leave_all(self, socket: Connection) -> None:
        for conversation_id in socket.conversations:
            assert socket.principal is not None
            feed = self._feeds.get((socket.principal.tenant, conversation_id))
            if feed is not None:
                feed.sockets.discard(socket)
                self._close_if_unused(feed)
        socket.conversations.clear()

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
        tasks = [*self._tasks, *(f.task for f in self._feeds.values() if f.task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._feeds.clear()

    def _close_if_unused(self, feed: Feed) -> None:
        if feed.sockets or feed.joining:
            return
        if self._feeds.get((feed.tenant, feed.conversation_id)) is feed:
            del self._feeds[(feed.tenant, feed.conversation_id)]
        if feed.task is not None:
            feed.task.cancel()

    async def _follow(self, feed: Feed, principal: Principal) -> None:
        """Keep one Watch open for the feed; after a failure, open it again from the last seq."""
        delay = RETRY_MIN_S
        proto_principal = session_pb2.Principal(tenant=principal.tenant, subject=principal.subject,
                                                role=principal.role)
        while True:
            call = self._clients.session.Watch(session_pb2.WatchRequest(
                principal=proto_principal, session_id=feed.conversation_id, after_seq=feed.last_seq))
            try:
                metadata = await call.initial_metadata()
                if metadata is None or WATCH_READY_HEADER not in dict(metadata):
                    await call.read()  # raises the call's error
                    raise FeedUnavailable("watch ended before it started")
                if not feed.ready.done():
                    feed.ready.set_result(None)
                delay = RETRY_MIN_S
                async for response in call:
                    feed.publish(response.message)
                raise FeedUnavailable("watch ended")
            except (grpc.aio.AioRpcError, FeedUnavailable) as error:
                code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
                failure: Exception = NotYours(feed.conversation_id) if code is grpc.StatusCode.NOT_FOUND \
                    else FeedUnavailable(str(error))
                if not feed.ready.done():
                    feed.ready.set_exception(failure)
                    self._drop(feed)
                    return
                if isinstance(failure, NotYours):
                    # Deleted while watched: it answers 404 everywhere now.
                    for socket in list(feed.sockets):
                        socket.close(4003, "conversation deleted")
                    self._drop(feed)
                    return
                log.warning("watch of a conversation failed (%s); reopening", code or error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            finally:
                call.cancel()

    def _drop(self, feed: Feed) -> None:
        if self._feeds.get((feed.tenant, feed.conversation_id)) is feed:
            del self._feeds[(feed.tenant, feed.conversation_id)]
        # Nobody may be waiting on `ready` any more; do not let an unread exception be logged.
        if feed.ready.done() and not feed.ready.cancelled():
            feed.ready.exception()

    async def _history(self, principal: Principal, conversation_id: str) -> list[session_pb2.Message]:
        try:
            reply = await self._clients.session.ListMessages(session_pb2.ListMessagesRequest(
                principal=session_pb2.Principal(tenant=principal.tenant, subject=principal.subject,
                                                role=principal.role),
                session_id=conversation_id), timeout=self._settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                raise NotYours(conversation_id) from None
            raise FeedUnavailable(error.details() or str(error.code())) from None
        return list(reply.messages)

    async def _last_seq(self, principal: Principal, conversation_id: str) -> int:
        history = await self._history(principal, conversation_id)
        return int(history[-1].seq) if history else 0

