"""Live frames between edges on a real nats-server: one dispatch point per edge, interest per conversation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devtools.devstack.nats_server import NatsServer, start_nats_server
from gateway.bus import EdgeBus
from gateway.live.channels import LiveChannels, Route, conversation_subject, count_routes, unsubscribe

WAIT_S = 5.0


class Inbox:
    """What one handler got, awaitable."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, object]] = []
        self._changed = asyncio.Event()

    def __call__(self, payload: dict[str, object]) -> None:
        self.payloads.append(payload)
        self._changed.set()

    async def wait_for(self, count: int) -> list[dict[str, object]]:
        async with asyncio.timeout(WAIT_S):
            while len(self.payloads) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.payloads


@pytest.fixture
async def edges(nats_server: NatsServer) -> AsyncIterator[tuple[LiveChannels, LiveChannels]]:
    buses = [EdgeBus(nats_server.url, name=f"edge-{i}") for i in range(2)]
    for bus in buses:
        bus.start()
    try:
        for bus in buses:  # a publish on a bus still connecting is skipped (best effort): connected first
            await bus.connection(timeout_s=5)
        yield LiveChannels(buses[0]), LiveChannels(buses[1])
    finally:
        for bus in buses:
            await bus.close()


async def test_a_frame_reaches_only_the_edges_following_that_conversation_of_that_tenant(
        edges: tuple[LiveChannels, LiveChannels]) -> None:
    sender, follower = edges
    own, same_tenant, other_conversation, other_tenant = Inbox(), Inbox(), Inbox(), Inbox()
    subject = conversation_subject("t1", "c1")
    routes = [await sender.route(subject, own),
              await follower.route(subject, same_tenant),
              await follower.route(conversation_subject("t1", "c2"), other_conversation),
              await follower.route(conversation_subject("t2", "c1"), other_tenant)]
    assert all(isinstance(route, Route) for route in routes)
    assert count_routes(follower.bus.nc) == 3
    assert not [task for task in asyncio.all_tasks() if "wait_for_msgs" in repr(task.get_coro())]
    await follower.bus.nc.flush()  # the server has every SUB before anything is published

    await sender.publish(subject, {"frame": {"type": "typing", "n": 1}})
    await sender.publish(subject, {"frame": {"type": "typing", "n": 2}})
    # Sent after them on the same connection: once it is in, the two above were delivered or never will be.
    await sender.publish(conversation_subject("t1", "c2"), {"frame": {"type": "read"}})
    await other_conversation.wait_for(1)

    got = await same_tenant.wait_for(2)
    assert [p["frame"] for p in got] == [{"type": "typing", "n": 1}, {"type": "typing", "n": 2}]
    assert all(p["origin"] == sender.edge_id for p in got)
    assert own.payloads == []  # an edge skips what it sent itself
    assert other_tenant.payloads == []
    for route in routes:
        await unsubscribe(route)


async def test_a_removed_route_gets_nothing_and_leaves_the_connection(
        edges: tuple[LiveChannels, LiveChannels]) -> None:
    sender, follower = edges
    gone, kept = Inbox(), Inbox()
    gone_route = await follower.route(conversation_subject("t1", "gone"), gone)
    kept_route = await follower.route(conversation_subject("t1", "kept"), kept)
    nc = follower.bus.nc
    subscriptions_before = len(nc._subs)

    await unsubscribe(gone_route)
    await unsubscribe(gone_route)  # twice is harmless
    assert count_routes(nc) == 1
    assert len(nc._subs) == subscriptions_before - 1
    await nc.flush()  # the server has the UNSUB before anything is published

    await sender.publish(conversation_subject("t1", "gone"), {"frame": {"type": "typing"}})
    await sender.publish(conversation_subject("t1", "kept"), {"frame": {"type": "typing"}})
    await kept.wait_for(1)
    assert gone.payloads == []
    await unsubscribe(kept_route)
    assert count_routes(nc) == 0


async def test_routes_come_back_after_nats_restarts(tmp_path: Path) -> None:
    server = start_nats_server(tmp_path / "nats")
    port = int(server.url.rsplit(":", 1)[1])
    sender_bus, follower_bus = EdgeBus(server.url, name="sender"), EdgeBus(server.url, name="follower")
    sender_bus.start()
    follower_bus.start()
    try:
        sender, follower = LiveChannels(sender_bus), LiveChannels(follower_bus)
        inbox = Inbox()
        subject = conversation_subject("t1", "c1")
        route = await follower.route(subject, inbox)
        assert route is not None
        await sender_bus.connection(timeout_s=5)
        reconnected = asyncio.Event()
        follower_bus.reconnect_listeners.append(reconnected.set)

        server.stop()
        server = start_nats_server(tmp_path / "nats2", port=port)
        async with asyncio.timeout(15):
            await reconnected.wait()
            while not sender_bus.is_connected:
                await asyncio.sleep(0.05)
        await follower_bus.nc.flush()  # the replayed SUB is in before the publish

        await sender.publish(subject, {"frame": {"type": "typing"}})
        assert (await inbox.wait_for(1))[0]["frame"] == {"type": "typing"}
        await unsubscribe(route)
    finally:
        await sender_bus.close()
        await follower_bus.close()
        server.stop()


async def test_an_edge_closing_with_routes_left_drains_them(nats_server: NatsServer) -> None:
    sender_bus, closing_bus = EdgeBus(nats_server.url, name="sender"), EdgeBus(nats_server.url, name="closing")
    sender_bus.start()
    closing_bus.start()
    try:
        await sender_bus.connection(timeout_s=5)
        sender, closing = LiveChannels(sender_bus), LiveChannels(closing_bus)
        inbox = Inbox()
        subject = conversation_subject("t1", "c1")
        assert await closing.route(subject, inbox) is not None
        nc = closing_bus.nc
        await closing_bus.close()  # nats-py's drain goes through every entry of the connection, routes too
        assert nc.is_closed and count_routes(nc) == 0
        await sender.publish(subject, {"frame": {"type": "typing"}})
        await (await sender_bus.connection(timeout_s=5)).flush()
        assert inbox.payloads == []
    finally:
        await sender_bus.close()


def test_a_failing_handler_does_not_stop_the_others() -> None:
    class Message:
        data = b'{"frame": {}, "origin": "elsewhere"}'

    delivered: list[dict[str, object]] = []

    def explode(payload: dict[str, object]) -> None:
        delivered.append(payload)
        raise RuntimeError("a bug in a handler")

    channels = LiveChannels.__new__(LiveChannels)
    channels.edge_id = "here"
    route = Route.__new__(Route)
    route._subject = "kefu.live.t1.c.c1"
    route._channels = channels
    route._handler = explode
    route.put_nowait(Message())  # type: ignore[arg-type]  # logged, not raised into nats-py's read loop
    assert delivered == [{"frame": {}, "origin": "elsewhere"}]
