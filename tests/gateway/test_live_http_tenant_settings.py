"""/v1/tenant/settings and TenantSettingsStore: staff read, admins write, one KV value per tenant, a short cache."""

from __future__ import annotations

import json

import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from devtools.devstack.stack import free_port
from gateway.app import create_app
from gateway.directory.buckets import Buckets
from gateway.directory.tenants import DEFAULT_OFFLINE, DEFAULT_WELCOME, TenantSettings, TenantSettingsStore
from tests.gateway.live_http_support import ClientFactory, EdgeClient, bearer, edge_settings, expect_error, start_edge

DEFAULTS = {"welcome": DEFAULT_WELCOME, "offline": DEFAULT_OFFLINE, "leave_message": DEFAULT_OFFLINE,
            "system_prompt": "", "assistant_name": "", "route": "", "grounding": "strict"}


@pytest.fixture
async def client(nats_server: NatsServer, aiohttp_client: ClientFactory) -> EdgeClient:
    return await start_edge(aiohttp_client, edge_settings(nats_server.url))


def buckets_over(nc: NatsClient) -> Buckets:
    async def connection() -> NatsClient:
        return nc

    return Buckets(connection)


async def read(client: EdgeClient, tenant: str = "shop1", role: str = "agent") -> dict[str, str]:
    response = await client.get("/v1/tenant/settings", headers=bearer(role=role, tenant=tenant))
    assert response.status == 200
    settings: dict[str, str] = await response.json()
    return settings


async def test_tenant_settings_default_then_admin_sets_them(client: EdgeClient, nats_client: NatsClient) -> None:
    assert await read(client) == DEFAULTS
    texts = {"welcome": "欢迎光临茶叶小店！", "offline": "We are closed.", "leave_message": "Leave a note, we reply."}
    chosen = {**DEFAULTS, **texts}
    response = await client.put("/v1/tenant/settings", json=texts, headers=bearer(role="admin"))
    assert response.status == 200 and await response.json() == chosen
    assert await read(client) == chosen
    # The KV value the session service reads: exactly these field names.
    stored = await (await nats_client.jetstream().key_value("kefu_tenants")).get("shop1")
    assert json.loads(stored.value or b"") == chosen
    # PUT replaces the whole settings: a field left out is back to its default.
    response = await client.put("/v1/tenant/settings", json={"welcome": "  Hello  "}, headers=bearer(role="admin"))
    assert await response.json() == {**DEFAULTS, "welcome": "Hello"}


async def test_tenant_settings_roles(client: EdgeClient) -> None:
    await expect_error(await client.put("/v1/tenant/settings", json={"welcome": "hi"}, headers=bearer()),
                       403, "forbidden")
    visitor = bearer(role="visitor", sub="v_a")
    await expect_error(await client.get("/v1/tenant/settings", headers=visitor), 403, "forbidden")
    await expect_error(await client.put("/v1/tenant/settings", json={"welcome": "hi"}, headers=visitor),
                       403, "forbidden")
    await expect_error(await client.get("/v1/tenant/settings"), 401, "unauthorized")
    assert await read(client, role="admin") == DEFAULTS


async def test_tenant_settings_are_per_tenant(client: EdgeClient) -> None:
    response = await client.put("/v1/tenant/settings", json={"offline": "shop2 is closed"},
                                headers=bearer(role="admin", tenant="shop2"))
    assert response.status == 200
    assert (await read(client, tenant="shop2"))["offline"] == "shop2 is closed"
    assert await read(client) == DEFAULTS


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{", 400, "invalid_json"),
    (b'{"welcome": ""}', 422, "invalid_request"),
    (b'{"welcome": " \\n "}', 422, "invalid_request"),
    (b'{"welcome": null}', 422, "invalid_request"),
    (b'{"offline": 3}', 422, "invalid_request"),
    (b'{"greeting": "hi"}', 422, "invalid_request"),
    (b'{"leave_message": "' + b"x" * 2001 + b'"}', 422, "invalid_request"),
    (b'{"welcome": "' + b"x" * 5000 + b'"}', 413, "body_too_large"),
    (b'{"grounding": "loose"}', 422, "invalid_request"),
    (b'{"assistant_name": "' + b"x" * 65 + b'"}', 422, "invalid_request"),
    (b'{"route": 5}', 422, "invalid_request"),
])
async def test_tenant_settings_refuse_bad_bodies(client: EdgeClient, body: bytes, status: int, code: str) -> None:
    response = await client.put("/v1/tenant/settings", data=body,
                                headers={**bearer(role="admin"), "Content-Type": "application/json"})
    await expect_error(response, status, code)
    assert await read(client) == DEFAULTS


async def test_tenant_settings_store_cache_sees_other_writers_after_its_lifetime(nats_client: NatsClient) -> None:
    now = [1000.0]
    writer = TenantSettingsStore(buckets_over(nats_client))
    reader = TenantSettingsStore(buckets_over(nats_client), cache_s=5.0, clock=lambda: now[0])
    assert await reader.get("shop1") == TenantSettings()
    await writer.put("shop1", TenantSettings(welcome="new welcome"))
    now[0] += 4.0
    assert (await reader.get("shop1")).welcome == DEFAULT_WELCOME  # still the cached copy
    now[0] += 1.5
    assert (await reader.get("shop1")) == TenantSettings(welcome="new welcome")
    assert (await reader.get("shop2")) == TenantSettings()


async def test_tenant_settings_store_reads_what_another_writer_stored(nats_client: NatsClient) -> None:
    kv = await buckets_over(nats_client).open("kefu_tenants")
    # A value written elsewhere (e.g. by hand) with one field, one blank and one unknown: defaults fill in.
    await kv.put("shop1", json.dumps({"leave_message": "留言吧", "welcome": " ", "extra": 1}).encode())
    assert await TenantSettingsStore(buckets_over(nats_client)).get("shop1") == TenantSettings(leave_message="留言吧")


async def test_tenant_settings_without_nats(aiohttp_client: ClientFactory) -> None:
    settings = edge_settings(f"nats://127.0.0.1:{free_port()}", rpc_timeout_s=0.3)
    client = await aiohttp_client(create_app(settings))
    await expect_error(await client.get("/v1/tenant/settings", headers=bearer()), 503, "unavailable")
    # Live chat's read never fails: the defaults.
    async def unreachable() -> NatsClient:
        raise TimeoutError("no nats")

    assert await TenantSettingsStore(Buckets(unreachable)).get("shop1") == TenantSettings()


async def test_tenant_assistant_settings_are_stored_trimmed(client: EdgeClient) -> None:
    chosen = {"system_prompt": " You are Mei, the tea shop's assistant. ", "assistant_name": "Mei",
              "grounding": "open"}
    response = await client.put("/v1/tenant/settings", json=chosen, headers=bearer(role="admin"))
    assert response.status == 200
    assert await read(client) == {**DEFAULTS, "system_prompt": "You are Mei, the tea shop's assistant.",
                                  "assistant_name": "Mei", "grounding": "open"}


async def test_tenant_route_is_checked_against_the_worker_and_nothing_is_stored_when_it_is_down(
        client: EdgeClient) -> None:
    # This edge's worker address is dead: a route cannot be checked, so the PUT fails and stores nothing.
    response = await client.put("/v1/tenant/settings", json={"route": "premium"}, headers=bearer(role="admin"))
    await expect_error(response, 503, "upstream_unavailable")
    assert await read(client) == DEFAULTS


def test_tenant_settings_from_json_keeps_defaults_for_bad_assistant_fields() -> None:
    loaded = TenantSettings.from_json({"grounding": "loose", "route": 7, "assistant_name": "  ", "system_prompt": "p"})
    assert loaded == TenantSettings(system_prompt="p")
