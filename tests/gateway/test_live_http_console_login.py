"""POST /v1/console/login: agent accounts from NATS KV, argon2 hashes, one answer for every failure."""

from __future__ import annotations

import jwt
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from gateway import keys
from gateway.auth import JwtVerifier
from gateway.directory.agents import AgentAccounts
from gateway.directory.buckets import Buckets
from tests.gateway.live_http_support import SECRET, ClientFactory, EdgeClient, edge_settings, expect_error, start_edge


@pytest.fixture
async def client(nats_server: NatsServer, aiohttp_client: ClientFactory) -> EdgeClient:
    return await start_edge(aiohttp_client, edge_settings(nats_server.url, console_token_ttl_s=3600))


@pytest.fixture
async def accounts(nats_client: NatsClient) -> AgentAccounts:
    async def connection() -> NatsClient:
        return nats_client

    store = AgentAccounts(Buckets(connection))
    await store.add("shop1", "Alice", "correct horse battery", display_name="Alice Wang")
    await store.add("shop1", "boss", "admin password 1", role="admin")
    await store.add("shop2", "alice", "shop2 password!")
    return store


async def login(client: EdgeClient, tenant: str, username: str, password: str) -> tuple[int, dict[str, object]]:
    response = await client.post("/v1/console/login", json={"tenant": tenant, "username": username,
                                                            "password": password})
    body = await response.json()
    if "error" in body:
        body["error"].pop("request_id")
    return response.status, body


async def test_console_login_gives_an_agent_token(client: EdgeClient, accounts: AgentAccounts) -> None:
    status, body = await login(client, "shop1", "alice", "correct horse battery")  # usernames ignore case
    assert status == 200 and body["expires_in"] == 3600
    assert body["agent"] == {"id": "alice", "name": "Alice Wang", "role": "agent"}
    principal = JwtVerifier(client.app[keys.SETTINGS]).verify(str(body["token"]))
    assert (principal.tenant, principal.subject, principal.role) == ("shop1", "alice", "agent")
    assert jwt.decode(str(body["token"]), SECRET, algorithms=["HS256"])["name"] == "Alice Wang"
    # The token works on the staff routes, and an admin's on the admin ones.
    headers = {"Authorization": f"Bearer {body['token']}"}
    assert (await client.get("/v1/canned-replies", headers=headers)).status == 200
    status, boss = await login(client, "shop1", "boss", "admin password 1")
    assert status == 200 and boss["agent"] == {"id": "boss", "name": "boss", "role": "admin"}
    put = await client.put("/v1/tenant/settings", json={"welcome": "hi"},
                           headers={"Authorization": f"Bearer {boss['token']}"})
    assert put.status == 200


async def test_console_login_failures_all_look_alike(client: EdgeClient, accounts: AgentAccounts) -> None:
    await accounts.add("shop1", "carol", "carol's password")
    await accounts.set_disabled("shop1", "carol", True)
    failures = [await login(client, *attempt) for attempt in (
        ("shop1", "alice", "wrong password"),
        ("shop1", "nobody", "correct horse battery"),
        ("shop1", "carol", "carol's password"),  # disabled
        ("shop2", "alice", "correct horse battery"),  # shop1's password in shop2
        ("shop3", "alice", "correct horse battery"),  # no such tenant
        ("shop1", "Not A Valid Name!", "whatever"),
    )]
    assert failures == [(401, {"error": {"code": "invalid_credentials",
                                         "message": "wrong tenant, username or password"}})] * len(failures)
    await accounts.set_disabled("shop1", "carol", False)
    assert (await login(client, "shop1", "carol", "carol's password"))[0] == 200


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"not json", 400, "invalid_json"),
    (b'{"tenant": "shop1", "username": "alice"}', 422, "invalid_request"),
    (b'{"tenant": "shop1", "username": "alice", "password": ""}', 422, "invalid_request"),
    (b'{"tenant": "shop1", "username": "alice", "password": 12345678}', 422, "invalid_request"),
    (b'{"tenant": "a.b", "username": "alice", "password": "x"}', 422, "invalid_request"),
    (b'{"tenant": "shop1", "username": "alice", "password": "x", "role": "admin"}', 422, "invalid_request"),
    (b'{"tenant": "shop1", "username": "alice", "password": "' + b"x" * 1025 + b'"}', 422, "invalid_request"),
    (b'{"tenant": "shop1", "username": "alice", "password": "' + b"x" * 5000 + b'"}', 413, "body_too_large"),
])
async def test_console_login_refuses_bad_bodies(client: EdgeClient, body: bytes, status: int, code: str) -> None:
    response = await client.post("/v1/console/login", data=body, headers={"Content-Type": "application/json"})
    await expect_error(response, status, code)


async def test_console_login_is_rate_limited_per_address(nats_server: NatsServer, aiohttp_client: ClientFactory,
                                                         accounts: AgentAccounts) -> None:
    client = await start_edge(aiohttp_client, edge_settings(nats_server.url, widget_token_rps=0.01,
                                                            widget_token_burst=3))
    statuses = [(await login(client, "shop1", "alice", f"guess {n}"))[0] for n in range(3)]
    assert statuses == [401, 401, 401]
    limited = await client.post("/v1/console/login", json={"tenant": "shop1", "username": "alice",
                                                          "password": "correct horse battery"})
    await expect_error(limited, 429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1


async def test_console_login_stored_hash_is_argon2(accounts: AgentAccounts) -> None:
    account = await accounts.get("shop1", "alice")
    assert account is not None and account.password_hash.startswith("$argon2id$")
    assert "correct horse battery" not in account.password_hash
    reset = await accounts.reset_password("shop1", "alice", "a new password")
    assert reset.password_hash != account.password_hash
    assert await accounts.authenticate("shop1", "alice", "correct horse battery") is None
    assert await accounts.authenticate("shop1", "alice", "a new password") is not None
