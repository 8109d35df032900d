"""The agents' desk of each tenant on this edge: the queue, who is online, and assignments.

The queue (conversations in `waiting_human`, oldest first) comes from the session
service: refreshed when a state change is seen here or poked by another edge over NATS,
and every `poll_s` anyway (the session service's own timers change states too). Agents
get `queue_update` when it changes; visitors waiting get their `queue` position.
Presence lives in a KV bucket with a max age, refreshed while an agent has a socket, so
an agent whose edge died drops out by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

import grpc
import nats.errors
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from gateway.bus import BusUnavailable, EdgeBus
from gateway.clients import BackendClients
from gateway.live.channels import LiveChannels, desk_subject, unsubscribe
from gateway.live.connection import Connection
from gateway.live.feeds import Feed, edge_principal
from gateway.live.frames import QueueEntry, QueuePosition, QueueUpdate, StateEvent
from gateway.live.hub import LiveHub
from kefu.session.v1 import session_pb2
from services.common.nats_client import ensure_key_value

log = logging.getLogger(__name__)

PRESENCE_BUCKET = "kefu_presence"
PRESENCE_TTL_S = 60.0
PRESENCE_REFRESH_S = 20.0
QUEUE_LIMIT = 200
PREVIEW_CHARS = 120
DESK_IDLE_S = 60.0
"""A tenant's desk with no agent and no waiting visitor on this edge for this long is dropped."""


class Desk:
    """One tenant's agents on this edge and the tenant's queue as this edge last saw it."""

    def __init__(self, tenant: str, desks: Desks) -> None:
        self.tenant = tenant
        self.agents: set[Connection] = set()
        self.queue: tuple[QueueEntry, ...] = ()
        self.away: set[str] = set()
        """Agents (sub) of this edge who said `presence {status: "away"}`."""
        self._desks = desks
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None

    @property
    def busy(self) -> bool:
        """Worth polling: agents are here, or visitors here wait in the queue."""
        return bool(self.agents) or any(f.status == "waiting_human" and f.connections
                                        for f in self._desks.hub.feeds.feeds_of(self.tenant))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def poke(self) -> None:
        self._poke.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await unsubscribe(self._subscription)

    async def _run(self) -> None:
        self._subscription = await self._desks.channels.subscribe(desk_subject(self.tenant), self._from_other_edge)
        last_presence = 0.0
        last_busy = time.monotonic()
        while True:
            if self.busy:
                last_busy = time.monotonic()
                await self._refresh_queue()
            elif time.monotonic() - last_busy > DESK_IDLE_S:
                # Nobody of the tenant here needs it: let it go (no await between the check and the
                # removal, so an agent arriving now gets a new desk).
                self._desks.forget(self)
                await unsubscribe(self._subscription)
                return
            if self.agents and time.monotonic() - last_presence >= PRESENCE_REFRESH_S:
                last_presence = time.monotonic()
                await self._desks.write_presence(self.tenant, self.agents, self.away)
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._desks.poll_s):
                    await self._poke.wait()

    def _from_other_edge(self, payload: dict[str, object]) -> None:
        self._desks.apply(self.tenant, payload)
        self.poke()

    async def _refresh_queue(self) -> None:
        try:
            reply = await self._desks.clients.session.ListConversations(session_pb2.ListConversationsRequest(
                principal=edge_principal(self.tenant), status="waiting_human", limit=QUEUE_LIMIT),
                timeout=self._desks.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            log.warning("queue of a tenant not refreshed: %s", error.code())
            return
        queue = tuple(QueueEntry(c.session_id, c.state.since, c.preview[:PREVIEW_CHARS]) for c in reply.conversations)
        if queue == self.queue:
            return
        self.queue = queue
        update = QueueUpdate(queue)
        for agent in self.agents:
            agent.send(update)
        positions = {entry.conversation_id: index + 1 for index, entry in enumerate(queue)}
        for feed in self._desks.hub.feeds.feeds_of(self.tenant):
            position = positions.get(feed.conversation_id)
            if position is None:
                continue
            frame = QueuePosition(feed.conversation_id, position)
            for connection in feed.connections:
                if not connection.is_staff:
                    connection.send(frame)


class Desks:
    """The desks of every tenant with sockets on this edge."""

    def __init__(self, hub: LiveHub, clients: BackendClients, bus: EdgeBus, *, poll_s: float,
                 rpc_timeout_s: float) -> None:
        self.hub = hub
        self.clients = clients
        self.channels: LiveChannels = hub.channels
        self.poll_s = poll_s
        self.rpc_timeout_s = rpc_timeout_s
        self._bus = bus
        self._desks: dict[str, Desk] = {}
        self._presence: KeyValue | None = None
        self.on_assigned: Callable[[str, str, str], None] | None = None
        """(tenant, conversation_id, agent): join that agent's sockets here to the conversation."""
        self.on_unassigned: Callable[[str, str, str], None] | None = None
        """(tenant, conversation_id, agent): that agent's sockets here leave the conversation."""
        hub.feeds.state_listeners.append(self._state_changed)

    def desk(self, tenant: str) -> Desk:
        desk = self._desks.get(tenant)
        if desk is None:
            desk = self._desks[tenant] = Desk(tenant, self)
            desk.start()
        return desk

    def forget(self, desk: Desk) -> None:
        if self._desks.get(desk.tenant) is desk:
            del self._desks[desk.tenant]

    def add_agent(self, connection: Connection) -> Desk:
        assert connection.principal is not None
        desk = self.desk(connection.principal.tenant)
        desk.agents.add(connection)
        self.hub.spawn(self.write_presence(desk.tenant, {connection}, desk.away))
        if desk.queue:
            connection.send(QueueUpdate(desk.queue))
        desk.poke()
        return desk

    def remove_agent(self, connection: Connection) -> None:
        assert connection.principal is not None
        desk = self._desks.get(connection.principal.tenant)
        if desk is None:
            return
        desk.agents.discard(connection)
        subject = connection.principal.subject
        if not any(a.principal is not None and a.principal.subject == subject for a in desk.agents):
            desk.away.discard(subject)
            self.hub.spawn(self._remove_presence(connection.principal.tenant, subject))

    def set_presence(self, connection: Connection, status: str) -> None:
        assert connection.principal is not None
        desk = self.desk(connection.principal.tenant)
        if status == "away":
            desk.away.add(connection.principal.subject)
        else:
            desk.away.discard(connection.principal.subject)
        self.hub.spawn(self.write_presence(desk.tenant, {connection}, desk.away))

    def announce(self, tenant: str, payload: dict[str, object] | None = None) -> None:
        """Tell every edge (this one included) that the tenant's queue or assignments changed."""
        desk = self._desks.get(tenant)
        if desk is not None:
            desk.poke()
        if payload is not None:
            self.apply(tenant, payload)
        self.hub.spawn(self.channels.publish(desk_subject(tenant), payload or {"kind": "poke"}))

    def apply(self, tenant: str, payload: dict[str, object]) -> None:
        """An (un)assignment announced by any edge: this edge's sockets of that agent follow it."""
        conversation_id, agent = payload.get("conversation_id"), payload.get("agent")
        if not isinstance(conversation_id, str) or not isinstance(agent, str):
            return
        callback = {"assigned": self.on_assigned, "unassigned": self.on_unassigned}.get(str(payload.get("kind")))
        if callback is not None:
            callback(tenant, conversation_id, agent)

    async def agents_online(self, tenant: str) -> int:
        """Agents of the tenant with a socket on any edge and not away (from the presence bucket)."""
        kv = await self._presence_bucket()
        if kv is None:
            return 0
        online = 0
        watcher = await kv.watch(f"{tenant}.*", include_history=False, ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value and json.loads(entry.value).get("status") == "online":
                    online += 1
        finally:
            await watcher.stop()
        return online

    async def write_presence(self, tenant: str, connections: set[Connection], away: set[str]) -> None:
        kv = await self._presence_bucket()
        if kv is None:
            return
        written: set[str] = set()
        for connection in list(connections):
            principal = connection.principal
            if principal is None or principal.subject in written:
                continue
            written.add(principal.subject)
            status = "away" if principal.subject in away else "online"
            value = {"status": status, "name": principal.name or principal.subject, "updated": time.time()}
            with contextlib.suppress(nats.errors.Error):
                await kv.put(presence_key(tenant, principal.subject), json.dumps(value).encode())

    async def _remove_presence(self, tenant: str, subject: str) -> None:
        kv = await self._presence_bucket()
        if kv is not None:
            with contextlib.suppress(nats.errors.Error):
                await kv.purge(presence_key(tenant, subject))

    async def _presence_bucket(self) -> KeyValue | None:
        if self._presence is None:
            try:
                nc = await self._bus.connection(timeout_s=2.0)
                self._presence = await ensure_key_value(nc.jetstream(), KeyValueConfig(
                    bucket=PRESENCE_BUCKET, history=1, ttl=PRESENCE_TTL_S, storage=StorageType.MEMORY))
            except (BusUnavailable, nats.errors.Error) as error:
                log.warning("presence bucket unavailable: %s", error)
                return None
        return self._presence

    def _state_changed(self, feed: Feed, event: StateEvent) -> None:
        desk = self._desks.get(feed.tenant)
        if desk is not None:
            desk.poke()
        elif event.status == "waiting_human":
            self.desk(feed.tenant).poke()  # visitors here wait: keep their position current

    async def aclose(self) -> None:
        await asyncio.gather(*(desk.close() for desk in self._desks.values()), return_exceptions=True)
        self._desks.clear()


def presence_key(tenant: str, subject: str) -> str:
    # KV keys allow [-/_=.a-zA-Z0-9]; an agent id may hold anything else: hex-encode those.
    safe = subject if all(c.isascii() and (c.isalnum() or c in "-_=") for c in subject) else subject.encode().hex()
    return f"{tenant}.{safe}"
