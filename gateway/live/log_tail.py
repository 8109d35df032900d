"""One JetStream consumer per edge on the whole conversation log, demultiplexed to the followed conversations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from gateway.live.log_catchup import read_after
from services.common.conversation_log import LOG_STREAM, LOG_SUBJECT_PREFIX

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
"""The server's idle heartbeat of the edge's one consumer: how soon a lost consumer is noticed (at 3 missed)."""
INACTIVE_S = 30.0
"""The server deletes a consumer nobody listens to after this long (an edge that died)."""
MISSED_HEARTBEATS = 3
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0


class Follower(Protocol):
    """What the tail needs of a follower (gateway/live/log.py LogFollower)."""

    @property
    def subject(self) -> str: ...

    def receive(self, seq: int, data: bytes) -> None:
        """One stored event of its conversation, in stream order (it drops what it already had)."""


class LogTail:
    """The edge's one consumer on the conversation log, shared by every `Follower` of this process.

    A consumer per followed conversation cost an edge a server-side consumer, a subscription
    task and an idle heartbeat each: at 15k sockets 85 % of a core idle (issue 19). Here one
    push consumer (in memory, no acks, flow control, one idle heartbeat for the edge) delivers
    every event of the stream once; each is handed by subject to the followers of its
    conversation, and dropped in a dict lookup when nobody here follows it. A follower that
    joins reads what it missed with one direct get (gateway/live/log_catchup.py) while the
    tail buffers for it, then goes live with no gap and no duplicate. A lost consumer (a gap in
    its sequence, a reconnect, silence past its heartbeats) is recreated once for everyone from
    the last stream seq the tail handled.
    """

    def __init__(self, *, filter_subject: str = f"{LOG_SUBJECT_PREFIX}.>", heartbeat_s: float = HEARTBEAT_S,
                 inactive_s: float = INACTIVE_S, on_restart: Callable[[str], None] | None = None) -> None:
        self._filter = filter_subject
        self._heartbeat_s = heartbeat_s
        self._inactive_s = inactive_s
        self._on_restart = on_restart
        """Told why each restart happens (a metric): gap, reconnect, silent."""
        self._followers: dict[str, tuple[Follower, ...]] = {}
        """Subject -> its followers here (usually one: the edge's feed of the conversation; a tuple, the
        smallest holder, since every idle conversation keeps one)."""
        self._joining: dict[Follower, list[tuple[int, bytes]]] = {}
        """Followers still reading what they missed, with what the tail brought them meanwhile."""
        self._nc: NatsClient | None = None
        self._started = False
        self._subscription: Subscription | None = None
        self._consumer = ""
        self.position = 0
        """Stream seq of the newest event the tail handled: a new consumer starts after it."""
        self._delivered = 0
        """The current consumer's own sequence of its last delivery (a jump is a gap)."""
        self._heard = time.monotonic()
        self._starting = asyncio.Lock()
        self._restarting: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False
        self.restarts = 0
        self.consumers_created = 0

    @property
    def heartbeat_s(self) -> float:
        return self._heartbeat_s

    @property
    def silent_s(self) -> float:
        """Seconds since the consumer last delivered an event or a heartbeat."""
        return time.monotonic() - self._heard

    @property
    def followed(self) -> int:
        """Followers registered (joining or live)."""
        return sum(len(followers) for followers in self._followers.values())

    async def follow(self, nc: NatsClient, follower: Follower, after_seq: int) -> None:
        """Register `follower` and hand it every event of its subject with seq > `after_seq`, once and in
        order, then each new one. NATS errors propagate with the follower not registered (retry)."""
        await self._ensure_started(nc)
        # Registered before the read: whatever the read misses was published after it began, and
        # the tail brings that into the buffer; the follower drops the overlap by seq.
        self._followers[follower.subject] = (*self._followers.get(follower.subject, ()), follower)
        self._joining[follower] = []
        try:
            missed = await read_after(nc, follower.subject, after_seq)
        except BaseException:
            self._joining.pop(follower, None)
            self._remove(follower)
            raise
        # No await from here on: nothing the tail brings can come between the read and the buffer.
        for seq, data in missed:
            follower.receive(seq, data)
        for seq, data in self._joining.pop(follower, ()):
            follower.receive(seq, data)

    def unfollow(self, follower: Follower) -> None:
        self._joining.pop(follower, None)
        self._remove(follower)

    def _remove(self, follower: Follower) -> None:
        followers = self._followers.get(follower.subject)
        if followers is None:
            return
        rest = tuple(other for other in followers if other is not follower)
        if rest:
            self._followers[follower.subject] = rest
        else:
            del self._followers[follower.subject]

    def reconnected(self) -> None:
        """NATS came back: a restarted server has lost the in-memory consumer."""
        if self._started:
            self.restart("reconnect")

    def restart(self, reason: str) -> None:
        """Recreate the consumer after `position` (in the background; one restart at a time)."""
        if self._closed or not self._started:
            return
        if self._restarting is None or self._restarting.done():
            if self._on_restart is not None:
                self._on_restart(reason)
            self._restarting = asyncio.create_task(self._restart())

    async def aclose(self) -> None:
        self._closed = True
        tasks = [task for task in (self._restarting, self._watchdog) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._drop_consumer()
        self._followers.clear()
        self._joining.clear()

    # -- the consumer ---------------------------------------------------------------------------------

    async def _ensure_started(self, nc: NatsClient) -> None:
        if self._started:
            return
        async with self._starting:
            if self._started:
                return
            if self._closed:
                raise nats.errors.ConnectionClosedError
            # From the stream's end: older events come to each follower from its own read.
            info = await nc.jetstream().stream_info(LOG_STREAM)
            self.position = info.state.last_seq
            self._nc = nc  # before the consumer: its first delivery may be a flow-control request
            try:
                await self._start(nc)
            except BaseException:
                self._nc = None
                raise
            self._started = True
            self._watchdog = asyncio.create_task(self._watch())

    async def _start(self, nc: NatsClient) -> None:
        inbox = nc.new_inbox()
        self._delivered = 0
        # Current before the consumer exists: its first deliveries may come before add_consumer returns.
        subscription = self._subscription = await nc.subscribe(inbox, cb=self._deliver)
        config = ConsumerConfig(
            deliver_subject=inbox, filter_subject=self._filter, ack_policy=AckPolicy.NONE, mem_storage=True,
            num_replicas=1, flow_control=True, idle_heartbeat=self._heartbeat_s,
            inactive_threshold=self._inactive_s, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.position + 1)
        try:
            info = await nc.jetstream().add_consumer(LOG_STREAM, config)
        except BaseException:
            self._subscription = None
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
            raise
        self._consumer = info.name
        self.consumers_created += 1
        self._heard = time.monotonic()

    async def _restart(self) -> None:
        assert self._nc is not None
        self.restarts += 1
        await self._drop_consumer()
        delay = RETRY_MIN_S
        while True:
            try:
                await self._start(self._nc)
                return
            except (nats.errors.Error, TimeoutError) as error:
                log.warning("conversation log: consumer not recreated (%s); retrying",
                            str(error) or type(error).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _drop_consumer(self) -> None:
        subscription, consumer = self._subscription, self._consumer
        self._subscription, self._consumer = None, ""
        if subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        if consumer and self._nc is not None:
            # Now rather than after the server's inactivity timer.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._nc.jetstream().delete_consumer(LOG_STREAM, consumer)

    async def _watch(self) -> None:
        """One timer per edge: a consumer silent past its heartbeats was deleted on the server."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            if self.silent_s > MISSED_HEARTBEATS * self._heartbeat_s:
                log.warning("conversation log: consumer silent for %.0f s; recreating it", self.silent_s)
                self.restart("silent")

    async def _deliver(self, raw: Msg) -> None:
        if self._subscription is None or raw.sid != self._subscription._id:
            return  # from a consumer already replaced
        self._heard = time.monotonic()
        headers = raw.headers
        if headers and "Status" in headers:
            await self._control(raw, headers)
            return
        sequence = raw.metadata.sequence
        if sequence.consumer != self._delivered + 1:
            self.restart("gap")  # a message fell out (slow consumer, reconnect): again from `position`
            return
        self._delivered = sequence.consumer
        seq = sequence.stream
        if seq <= self.position:
            return
        self.position = seq
        followers = self._followers.get(raw.subject)
        if not followers:
            return
        for follower in followers:
            joining = self._joining.get(follower)
            if joining is not None:
                joining.append((seq, raw.data))
            else:
                follower.receive(seq, raw.data)

    async def _control(self, raw: Msg, headers: dict[str, str]) -> None:
        """Flow control asks for a reply; an idle heartbeat says how far the consumer got."""
        if raw.reply:
            with contextlib.suppress(nats.errors.Error):
                await raw.respond(b"")
            return
        stalled = headers.get("Nats-Consumer-Stalled")
        if stalled and self._nc is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._nc.publish(stalled, b"")
        last = headers.get("Nats-Last-Consumer")
        if last is not None and int(last) != self._delivered:
            self.restart("gap")
