"""A disabled agent account's tokens stop working: HTTP 401, WebSocket refused and open sockets closed (4001)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from devtools.mint_token import mint
from gateway.auth import Principal
from gateway.directory.account_status import AccountStatus
from gateway.directory.agents import AgentAccounts
from gateway.directory.buckets import Buckets
from tests.gateway.live_http_support import (
    SECRET,
    ClientFactory,
    EdgeClient,
    edge_settings,
    eventually,
    expect_error,
    start_edge,
)


def agent(tenant: str, subject: str) -> Principal:
    return Principal(tenant=tenant, subject=subject, role="agent")


@pytest.fixture
async def accounts(nats_client: NatsClient) -> AsyncIterator[AgentAccounts]:
    async def connection() -> NatsClient:
        return nats_client

    store = AgentAccounts(Buckets(connection))
    await store.add("shop1", "mei", "correct horse battery")
    yield store


async def test_account_status_sees_a_disable_after_its_cache_and_passes_strangers(accounts: AgentAccounts) -> None:
    connected = True
    status = AccountStatus(accounts, lambda: connected, ttl_s=60.0)
    assert not await status.disabled(agent("shop1", "mei"))
    await accounts.set_disabled("shop1", "mei", True)
    assert not await status.disabled(agent("shop1", "mei"))  # cached for ttl_s
    fresh = AccountStatus(accounts, lambda: connected, ttl_s=0.0)
    assert await fresh.disabled(agent("shop1", "mei"))
    # Other tenants, other spellings and subjects no account could have (an identity provider's) pass.
    assert not await fresh.disabled(agent("shop2", "mei"))
    assert not await fresh.disabled(agent("shop1", "MEI"))
    assert not await fresh.disabled(agent("shop1", "auth0|5f7c8ec7c33c6c004bbafe82"))
    # Without NATS nothing is read and nobody is locked out by it.
    connected = False
    assert not await AccountStatus(accounts, lambda: connected, ttl_s=0.0).disabled(agent("shop1", "mei"))


async def test_disabled_account_is_locked_out_over_http_and_websocket(
        nats_server: NatsServer, aiohttp_client: ClientFactory, accounts: AgentAccounts) -> None:
    client: EdgeClient = await start_edge(aiohttp_client, edge_settings(
        nats_server.url, account_check_s=0.2, rpc_timeout_s=0.5))
    token = mint(SECRET, tenant="shop1", subject="mei", role="agent")
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/v1/canned-replies", headers=headers)).status == 200
    ws = await client.ws_connect("/v1/ws")
    await ws.send_str(json.dumps({"type": "hello", "token": token}))
    welcome = json.loads((await ws.receive(timeout=10)).data)
    assert welcome["type"] == "welcome" and welcome["role"] == "agent"

    await accounts.set_disabled("shop1", "mei", True)
    frames = []
    while True:  # the open socket is told why, then closed
        message = await ws.receive(timeout=10)
        if message.type is not aiohttp.WSMsgType.TEXT:
            break
        frames.append(json.loads(message.data))
    assert ws.close_code == 4001
    assert {"type": "error", "code": "unauthorized", "message": "this account is disabled"} in frames
    error = await expect_error(await client.get("/v1/canned-replies", headers=headers), 401, "unauthorized")
    assert error["message"] == "this account is disabled"
    again = await client.ws_connect("/v1/ws")
    await again.send_str(json.dumps({"type": "hello", "token": token}))
    refusal = json.loads((await again.receive(timeout=10)).data)
    assert refusal["code"] == "unauthorized" and (await again.receive(timeout=10)).type is aiohttp.WSMsgType.CLOSE
    assert again.close_code == 4001

    await accounts.set_disabled("shop1", "mei", False)

    async def works_again() -> bool:
        return (await client.get("/v1/canned-replies", headers=headers)).status == 200

    await eventually(works_again, what="an enabled account's token works again")
