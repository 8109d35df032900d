"""/v1/blacklist and the watched Blacklist copy: entries per tenant, CIDR matching, changes seen by other edges."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from gateway.directory.blacklist import Blacklist, BlacklistStore
from gateway.directory.buckets import Buckets
from tests.gateway.live_http_support import (
    ClientFactory,
    EdgeClient,
    bearer,
    edge_settings,
    eventually,
    expect_error,
    start_edge,
)


@pytest.fixture
async def client(nats_server: NatsServer, aiohttp_client: ClientFactory) -> EdgeClient:
    return await start_edge(aiohttp_client, edge_settings(nats_server.url))


@pytest.fixture
async def store(nats_client: NatsClient) -> BlacklistStore:
    async def connection() -> NatsClient:
        return nats_client

    return BlacklistStore(Buckets(connection))


@pytest.fixture
async def watched(nats_client: NatsClient) -> AsyncIterator[Blacklist]:
    blacklist = Blacklist()
    await blacklist.start(nats_client)
    try:
        yield blacklist
    finally:
        await blacklist.aclose()


async def entries(client: EdgeClient, tenant: str = "shop1") -> list[dict[str, object]]:
    response = await client.get("/v1/blacklist", headers=bearer(tenant=tenant))
    assert response.status == 200
    listed: list[dict[str, object]] = (await response.json())["entries"]
    return listed


async def test_blacklist_add_list_delete(client: EdgeClient) -> None:
    visitor = await client.post("/v1/blacklist", json={"visitor_id": "v_troll", "reason": "abuse"}, headers=bearer())
    assert visitor.status == 201
    added = await visitor.json()
    assert added["visitor_id"] == "v_troll" and added["reason"] == "abuse" and "address" not in added
    network = await client.post("/v1/blacklist", json={"address": "203.0.113.77/24"}, headers=bearer(role="admin"))
    assert network.status == 201 and (await network.json())["address"] == "203.0.113.0/24"  # normalised
    host = await client.post("/v1/blacklist", json={"address": "2001:db8::1"}, headers=bearer())
    assert (await host.json())["address"] == "2001:db8::1/128"
    listed = await entries(client)
    assert [(e.get("visitor_id"), e.get("address")) for e in listed] == [
        ("v_troll", None), (None, "203.0.113.0/24"), (None, "2001:db8::1/128")]
    assert all(e["tenant"] == "shop1" and e["created_by"] == "agent-1" for e in listed[:1])
    assert (await client.delete(f"/v1/blacklist/{added['id']}", headers=bearer())).status == 204
    assert len(await entries(client)) == 2
    await expect_error(await client.delete(f"/v1/blacklist/{added['id']}", headers=bearer()), 404, "not_found")
    await expect_error(await client.delete("/v1/blacklist/not-an-id", headers=bearer()), 404, "not_found")


async def test_blacklist_is_per_tenant(client: EdgeClient) -> None:
    added = await (await client.post("/v1/blacklist", json={"visitor_id": "v_x"}, headers=bearer())).json()
    assert await entries(client, "shop2") == []
    await expect_error(await client.delete(f"/v1/blacklist/{added['id']}", headers=bearer(tenant="shop2")),
                       404, "not_found")
    assert [e["id"] for e in await entries(client)] == [added["id"]]


async def test_blacklist_is_for_staff_only(client: EdgeClient) -> None:
    visitor = bearer(role="visitor", sub="v_me")
    await expect_error(await client.get("/v1/blacklist", headers=visitor), 403, "forbidden")
    await expect_error(await client.post("/v1/blacklist", json={"visitor_id": "v_other"}, headers=visitor),
                       403, "forbidden")
    await expect_error(await client.delete("/v1/blacklist/0123456789abcdef", headers=visitor), 403, "forbidden")
    await expect_error(await client.post("/v1/blacklist", json={"visitor_id": "v_other"}), 401, "unauthorized")


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"nope", 400, "invalid_json"),
    (b"{}", 422, "invalid_request"),
    (b'{"visitor_id": "v_a", "address": "10.0.0.1"}', 422, "invalid_request"),
    (b'{"reason": "no target"}', 422, "invalid_request"),
    (b'{"address": "999.1.1.1"}', 422, "invalid_request"),
    (b'{"address": "10.0.0.0/33"}', 422, "invalid_request"),
    (b'{"address": "example.com"}', 422, "invalid_request"),
    (b'{"visitor_id": "has space"}', 422, "invalid_request"),
    (b'{"visitor_id": "v_a", "reason": "' + b"r" * 201 + b'"}', 422, "invalid_request"),
    (b'{"visitor_id": "v_a", "reason": "' + b"r" * 5000 + b'"}', 413, "body_too_large"),
])
async def test_blacklist_refuses_bad_bodies(client: EdgeClient, body: bytes, status: int, code: str) -> None:
    response = await client.post("/v1/blacklist", data=body, headers={**bearer(), "Content-Type": "application/json"})
    await expect_error(response, status, code)
    assert await entries(client) == []


async def test_blacklist_copy_follows_changes_made_elsewhere(watched: Blacklist, store: BlacklistStore) -> None:
    assert watched.ready and not watched.blocks("shop1", "v_troll", "198.51.100.9")
    changed: list[str] = []
    watched.on_change(changed.append)
    visitor = await store.add("shop1", visitor_id="v_troll", reason="abuse")
    await store.add("shop1", address="198.51.100.0/24")

    async def both_blocked() -> bool:
        return watched.blocks("shop1", "v_troll", None) and watched.blocks("shop1", "v_ok", "198.51.100.9")

    await eventually(both_blocked, what="the watch picks up both entries")
    assert set(changed) == {"shop1"}
    assert not watched.blocks("shop1", "v_ok", "198.51.101.9")
    assert watched.blocks("shop1", None, "::ffff:198.51.100.200")  # IPv4-mapped IPv6 is the same address
    assert not watched.blocks("shop2", "v_troll", "198.51.100.9")  # another tenant's list
    assert not watched.blocks("shop1", "", "not an address")
    assert [e.visitor_id for e in watched.entries("shop1")] == ["v_troll", ""]
    await store.delete("shop1", visitor.id)

    async def unblocked() -> bool:
        return not watched.blocks("shop1", "v_troll", None)

    await eventually(unblocked, what="the watch picks up the delete")
    assert watched.blocks("shop1", "v_ok", "198.51.100.9")


async def test_blacklist_copy_loads_what_was_there_before(store: BlacklistStore, nats_client: NatsClient) -> None:
    await store.add("shop2", address="2001:db8:77::/48")
    blacklist = Blacklist()
    await blacklist.start(nats_client)
    try:
        assert blacklist.ready and blacklist.blocks("shop2", None, "2001:db8:77::5")
        assert not blacklist.blocks("shop2", None, "2001:db8:78::5")
    finally:
        await blacklist.aclose()


async def test_blacklist_edge_sees_another_edges_change(nats_server: NatsServer, aiohttp_client: ClientFactory) -> None:
    """Two edges on one NATS: an entry posted on one blocks widget tokens on the other."""
    first = await start_edge(aiohttp_client, edge_settings(nats_server.url))
    second = await start_edge(aiohttp_client, edge_settings(nats_server.url))
    assert (await first.post("/v1/blacklist", json={"address": "127.0.0.1"}, headers=bearer())).status == 201

    async def refused_on_second() -> bool:
        return (await second.post("/v1/widget/token", json={"tenant": "shop1"})).status == 403

    await eventually(refused_on_second, what="the second edge's copy picks up the entry")
