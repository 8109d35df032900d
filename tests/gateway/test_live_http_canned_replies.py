"""/v1/canned-replies: staff create, search and delete their tenant's replies in NATS KV; nobody else sees them."""

from __future__ import annotations

import pytest

from devtools.devstack.nats_server import NatsServer
from devtools.devstack.stack import free_port
from gateway.app import create_app
from gateway.directory import canned
from tests.gateway.live_http_support import ClientFactory, EdgeClient, bearer, edge_settings, expect_error, start_edge


@pytest.fixture
async def client(nats_server: NatsServer, aiohttp_client: ClientFactory) -> EdgeClient:
    return await start_edge(aiohttp_client, edge_settings(nats_server.url))


async def create(client: EdgeClient, tenant: str = "shop1", **body: str) -> dict[str, object]:
    response = await client.post("/v1/canned-replies", json=body, headers=bearer(tenant=tenant))
    assert response.status == 201, await response.text()
    created: dict[str, object] = await response.json()
    return created


async def titles(client: EdgeClient, tenant: str = "shop1", q: str | None = None) -> list[str]:
    response = await client.get("/v1/canned-replies", params={"q": q} if q is not None else None,
                                headers=bearer(tenant=tenant))
    assert response.status == 200
    return [reply["title"] for reply in (await response.json())["canned_replies"]]


async def test_canned_replies_create_search_delete(client: EdgeClient) -> None:
    shipping = await create(client, title="Shipping time", text="Orders ship within 48 hours.", shortcut="ship")
    assert len(str(shipping["id"])) == 16 and shipping["created_by"] == "agent-1" and shipping["shortcut"] == "ship"
    refund = await create(client, title="退款", text="Refunds take 3-5 working days / 退款需要3-5个工作日。")
    assert "shortcut" not in refund
    assert await titles(client) == ["Shipping time", "退款"]  # with a shortcut first, then by title
    assert await titles(client, q="SHIP") == ["Shipping time"]  # title and shortcut, any case
    assert await titles(client, q="working DAYS") == ["退款"]  # text
    assert await titles(client, q="退款需要") == ["退款"]
    assert await titles(client, q="nothing like it") == []
    deleted = await client.delete(f"/v1/canned-replies/{shipping['id']}", headers=bearer(sub="agent-2"))
    assert deleted.status == 204
    assert await titles(client) == ["退款"]
    await expect_error(await client.delete(f"/v1/canned-replies/{shipping['id']}", headers=bearer()),
                       404, "not_found")
    await expect_error(await client.delete("/v1/canned-replies/..%2A", headers=bearer()), 404, "not_found")


async def test_canned_replies_are_per_tenant(client: EdgeClient) -> None:
    mine = await create(client, title="Greeting", text="Hello from shop1", shortcut="hi")
    assert await titles(client, tenant="shop2") == []
    # Another tenant may use the same shortcut, and cannot delete shop1's reply by its id.
    await create(client, tenant="shop2", title="Greeting", text="Hello from shop2", shortcut="hi")
    other = await client.delete(f"/v1/canned-replies/{mine['id']}", headers=bearer(tenant="shop2"))
    await expect_error(other, 404, "not_found")
    listed = await (await client.get("/v1/canned-replies", headers=bearer())).json()
    assert [(r["id"], r["text"]) for r in listed["canned_replies"]] == [(mine["id"], "Hello from shop1")]


async def test_canned_replies_are_for_staff_only(client: EdgeClient) -> None:
    visitor = bearer(role="visitor", sub="v_someone")
    await expect_error(await client.get("/v1/canned-replies", headers=visitor), 403, "forbidden")
    await expect_error(await client.post("/v1/canned-replies", json={"title": "t", "text": "x"}, headers=visitor),
                       403, "forbidden")
    await expect_error(await client.delete("/v1/canned-replies/0123456789abcdef", headers=visitor), 403, "forbidden")
    await expect_error(await client.get("/v1/canned-replies"), 401, "unauthorized")
    assert (await client.get("/v1/canned-replies", headers=bearer(role="admin"))).status == 200


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"[1, 2", 400, "invalid_json"),
    (b'{"title": "t"}', 422, "invalid_request"),
    (b'{"title": "   ", "text": "x"}', 422, "invalid_request"),
    (b'{"title": "t", "text": "x", "shortcut": "two words"}', 422, "invalid_request"),
    (b'{"title": "t", "text": "x", "shortcut": null}', 422, "invalid_request"),
    (b'{"title": "t", "text": "x", "owner": "me"}', 422, "invalid_request"),
    (b'{"title": "' + b"t" * 101 + b'", "text": "x"}', 422, "invalid_request"),
    (b'{"title": "t", "text": "' + b"x" * 2001 + b'"}', 422, "invalid_request"),
    (b'{"title": "t", "text": "' + b"x" * 5000 + b'"}', 413, "body_too_large"),
])
async def test_canned_replies_refuse_bad_bodies(client: EdgeClient, body: bytes, status: int, code: str) -> None:
    response = await client.post("/v1/canned-replies", data=body,
                                 headers={**bearer(), "Content-Type": "application/json"})
    await expect_error(response, status, code)
    assert await titles(client) == []


async def test_canned_replies_query_is_bounded(client: EdgeClient) -> None:
    await expect_error(await client.get("/v1/canned-replies", params={"q": "x" * 101}, headers=bearer()),
                       422, "invalid_request")


async def test_canned_replies_shortcut_taken_and_tenant_bound(client: EdgeClient,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    await create(client, title="one", text="1", shortcut="Same")
    taken = await client.post("/v1/canned-replies", json={"title": "two", "text": "2", "shortcut": "same"},
                              headers=bearer())
    await expect_error(taken, 409, "shortcut_taken")
    monkeypatch.setattr(canned, "MAX_PER_TENANT", 3)  # the bound itself, not 500 round trips
    await create(client, title="two", text="2")
    await create(client, title="three", text="3")
    full = await client.post("/v1/canned-replies", json={"title": "four", "text": "4"}, headers=bearer())
    await expect_error(full, 409, "limit_reached")
    await create(client, tenant="shop2", title="four", text="4")  # another tenant's own bound


async def test_canned_replies_without_nats_answer_503(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(edge_settings(f"nats://127.0.0.1:{free_port()}", rpc_timeout_s=0.3)))
    error = await expect_error(await client.get("/v1/canned-replies", headers=bearer()), 503, "unavailable")
    assert "not reachable" in str(error["message"])
