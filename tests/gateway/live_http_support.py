"""Shared pieces of the live-chat HTTP tests: an edge over a real nats-server, tokens, error checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from devtools.devstack.stack import free_port
from devtools.mint_token import mint
from gateway import keys
from gateway.app import create_app
from gateway.settings import GatewaySettings

SECRET = "test-secret-that-is-long-enough-for-hs256"
EdgeClient = TestClient[web.Request, web.Application]
"""What pytest-aiohttp's `aiohttp_client` gives for an edge app."""
ClientFactory = Callable[[web.Application], Awaitable[EdgeClient]]


def edge_settings(nats_url: str, **overrides: object) -> GatewaySettings:
    dead = f"127.0.0.1:{free_port()}"  # the gRPC backends are not needed here unless a test names one
    values: dict[str, object] = {
        "jwt_secret": SECRET, "nats_url": nats_url, "max_body_bytes": 4096, "session_addr": dead,
        "moderation_addr": dead, "worker_addr": dead, "rpc_timeout_s": 2.0,
        "widget_tenants": frozenset({"shop1", "shop2"})}
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]  # overrides of any field


def bearer(role: str = "agent", tenant: str = "shop1", sub: str = "agent-1") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(SECRET, tenant=tenant, subject=sub, role=role)}"}


async def expect_error(response: ClientResponse, status: int, code: str) -> dict[str, object]:
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (status, code), body
    assert body["error"]["request_id"] == response.headers["X-Request-Id"]
    error: dict[str, object] = body["error"]
    return error


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0, what: str = "") -> None:
    """Poll `check` until it holds; fail after `timeout_s` (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.02)


async def start_edge(aiohttp_client: ClientFactory, settings: GatewaySettings) -> EdgeClient:
    """An edge whose NATS connection is up and whose blacklist copy is loaded (no start-up race left)."""
    client = await aiohttp_client(create_app(settings))
    blacklist = client.app[keys.BLACKLIST]

    async def loaded() -> bool:
        return blacklist.ready

    await eventually(loaded, what="the edge's blacklist copy is loaded")
    return client
