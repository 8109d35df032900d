"""Issue 17: a blacklisted visitor is refused on every HTTP route its still-valid token reaches, not only on
the WebSocket and the widget token; and `GET /v1/models` shows a visitor only the route it may use."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth, start_stack

TENANT = "shop1"
QUESTION = "How long does shipping take?"
PROPAGATION_S = 10.0
"""How long a blacklist change may take to reach the edge's watched copy (milliseconds on a quiet machine)."""
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")
HOME, ELSEWHERE, BLOCKED_NET, NEIGHBOUR = "198.51.100.7", "192.0.2.44", "203.0.113.0/24", "203.0.113.10"
"""Client addresses as the (trusted) proxy on 127.0.0.1 forwards them."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("sec-blocked-http"), {
        "KEFU_WIDGET_TENANTS": TENANT, "KEFU_TRUSTED_PROXIES": "127.0.0.1", "KEFU_RATE_LIMIT_RPS": "1000",
        "KEFU_WIDGET_TOKEN_RPS": "100", "KEFU_WIDGET_TOKEN_BURST": "100"})
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def read(response: aiohttp.ClientResponse) -> Any:
    """A JSON body, the whole text of an event stream (which must have ended with `done`), or None."""
    if response.content_type == "text/event-stream":
        text = await response.text()
        assert "event: done" in text, text[-500:]
        return text
    return await response.json() if response.status != 204 else None


class Visitor:
    """A widget visitor as the browser is one: its token from POST /v1/widget/token, one conversation."""

    def __init__(self, http: aiohttp.ClientSession, stack: Stack, token: str, visitor_id: str) -> None:
        self.http, self.stack, self.token, self.visitor_id = http, stack, token, visitor_id
        self.session_id = ""

    @classmethod
    async def arrive(cls, http: aiohttp.ClientSession, stack: Stack, address: str = HOME) -> Visitor:
        async with http.post(f"{stack.base_url}/v1/widget/token", json={"tenant": TENANT},
                             headers={"X-Forwarded-For": address}) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        visitor = cls(http, stack, body["token"], body["visitor_id"])
        status, reply = await visitor.call("POST", "/v1/chat", {"message": QUESTION, "stream": False}, address)
        assert status == 200, reply
        visitor.session_id = reply["session_id"]
        return visitor

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   address: str = HOME) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "X-Forwarded-For": address}
        async with self.http.request(method, f"{self.stack.base_url}{path}", json=body, headers=headers) as response:
            return response.status, await read(response)

    def routes(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        """Every route a visitor token reaches but DELETE (which is checked on its own: it ends the session)."""
        return [
            ("POST", "/v1/chat", {"message": QUESTION, "session_id": self.session_id, "stream": False}),
            ("POST", "/v1/chat", {"message": QUESTION, "session_id": self.session_id, "stream": True}),
            ("POST", "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": QUESTION}]}),
            ("GET", "/v1/models", None),
            ("GET", f"/v1/sessions/{self.session_id}/messages", None),
            ("GET", f"/v1/conversations/{self.session_id}/events", None),
        ]

    async def refusals(self, address: str = HOME) -> list[str]:
        """The routes that refused this visitor as blocked; any other refusal fails the test."""
        refused = []
        for method, path, body in self.routes():
            status, reply = await self.call(method, path, body, address)
            if status == 403 and reply["error"]["code"] == "blocked":
                if path in OPENAI_PATHS:  # OpenAI's error shape, so the SDKs raise PermissionDeniedError
                    assert reply["error"]["type"] == "permission_error", reply
                refused.append(f"{method} {path}")
            else:
                assert status == 200, (method, path, status, reply)
        return refused

    async def stored_messages(self) -> int:
        status, body = await self.call("GET", f"/v1/sessions/{self.session_id}/messages")
        assert status == 200, body
        return len(body["messages"])



async def staff(http: aiohttp.ClientSession, stack: Stack, method: str, path: str,
                body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with http.request(method, f"{stack.base_url}{path}", json=body,
                            headers=auth(TENANT, "moderator-1", "agent")) as response:
        return response.status, await read(response)


async def block(http: aiohttp.ClientSession, stack: Stack, **target: str) -> str:
    status, entry = await staff(http, stack, "POST", "/v1/blacklist", {**target, "reason": "abuse"})
    assert status == 201, entry
    return str(entry["id"])


async def unblock(http: aiohttp.ClientSession, stack: Stack, entry_id: str) -> None:
    status, body = await staff(http, stack, "DELETE", f"/v1/blacklist/{entry_id}")
    assert status == 204, body


async def until_models_says(visitor: Visitor, status: int, address: str = HOME) -> None:
    """Poll the cheapest route until the edge's copy of the blacklist has the change."""
    deadline = time.monotonic() + PROPAGATION_S
    while (await visitor.call("GET", "/v1/models", address=address))[0] != status:
        assert time.monotonic() < deadline, f"/v1/models not {status} within {PROPAGATION_S} s"
        await asyncio.sleep(0.05)


async def moderation_checks(http: aiohttp.ClientSession, stack: Stack) -> float:
    async with http.get(f"http://127.0.0.1:{stack.config.ports.moderation_metrics}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kefu_moderation_checks_total{"))


async def test_sec_blocked_visitor_is_refused_on_every_http_route(http: aiohttp.ClientSession, stack: Stack) -> None:
    troll = await Visitor.arrive(http, stack)
    other = await Visitor.arrive(http, stack)
    assert await troll.refusals() == []  # the attack's premise: the token works on every route
    stored = await troll.stored_messages()

    entry_id = await block(http, stack, visitor_id=troll.visitor_id)
    await until_models_says(troll, 403)
    checks = await moderation_checks(http, stack)
    assert len(await troll.refusals()) == len(troll.routes())  # the token is still valid, and worth nothing
    status, body = await troll.call("DELETE", f"/v1/sessions/{troll.session_id}")
    assert (status, body["error"]["code"]) == (403, "blocked")
    # Refused at the edge: no turn reached moderation, nothing was stored.
    assert await moderation_checks(http, stack) == checks
    # From another address as well (the entry names the visitor), and its token does not renew.
    assert (await troll.call("GET", "/v1/models", address=ELSEWHERE))[0] == 403
    async with http.post(f"{stack.base_url}/v1/widget/token", json={"tenant": TENANT},
                         headers={"Authorization": f"Bearer {troll.token}"}) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (403, "blocked")

    # Another visitor of the tenant is not affected, nor the staff reading the blocked one's conversation.
    assert await other.refusals() == []
    status, body = await staff(http, stack, "GET", f"/v1/conversations/{troll.session_id}/events")
    assert status == 200 and body["events"], body

    await unblock(http, stack, entry_id)
    await until_models_says(troll, 200)
    assert await troll.stored_messages() == stored  # the refused turns left no trace
    assert await troll.refusals() == []
    status, _ = await troll.call("DELETE", f"/v1/sessions/{troll.session_id}")
    assert status == 204


async def test_sec_blocked_address_is_refused_on_every_http_route(http: aiohttp.ClientSession, stack: Stack) -> None:
    roaming = await Visitor.arrive(http, stack, address=HOME)
    neighbour = await Visitor.arrive(http, stack, address=NEIGHBOUR)
    entry_id = await block(http, stack, address=BLOCKED_NET)
    try:
        await until_models_says(neighbour, 403, address=NEIGHBOUR)
        # Whoever comes from the blocked network is refused, whatever its token says...
        assert len(await neighbour.refusals(address=NEIGHBOUR)) == len(neighbour.routes())
        assert len(await roaming.refusals(address="203.0.113.200")) == len(roaming.routes())
        # ... and the same token from an address outside it works (the entry names the network, not them).
        assert await roaming.refusals(address=HOME) == []
        assert await neighbour.refusals(address=ELSEWHERE) == []
    finally:
        await unblock(http, stack, entry_id)
    await until_models_says(neighbour, 200, address=NEIGHBOUR)
    assert await neighbour.refusals(address=NEIGHBOUR) == []


async def model_ids(http: aiohttp.ClientSession, stack: Stack, role: str) -> list[str]:
    async with http.get(f"{stack.base_url}/v1/models", headers=auth(TENANT, f"{role}-7", role)) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return [model["id"] for model in body["data"]]


async def test_sec_visitor_sees_only_its_route_in_models(http: aiohttp.ClientSession, stack: Stack) -> None:
    # plugins/routes.toml has `default` and `knowledge-base`; a visitor's turns always use `default`.
    assert await model_ids(http, stack, "visitor") == ["default"]
    for role in ("agent", "admin", "api"):
        assert {"default", "knowledge-base"} <= set(await model_ids(http, stack, role)), role
    # What the list shows a visitor is what the visitor may ask for, and the rest is refused.
    visitor = auth(TENANT, "visitor-7")
    for model, status in (("default", 200), ("knowledge-base", 400)):
        async with http.post(f"{stack.base_url}/v1/chat/completions", headers=visitor, json={
                "model": model, "messages": [{"role": "user", "content": QUESTION}]}) as response:
            assert response.status == status, await response.text()
