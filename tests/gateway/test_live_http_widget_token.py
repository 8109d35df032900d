"""POST /v1/widget/token: anonymous visitor tokens, the renewal rules, per-address limits, blocked visitors."""

from __future__ import annotations

import re
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtools.devstack.nats_server import NatsServer
from gateway import keys
from gateway.auth import JwtVerifier
from tests.gateway.live_http_support import (
    SECRET,
    ClientFactory,
    EdgeClient,
    bearer,
    edge_settings,
    eventually,
    expect_error,
    start_edge,
)

DAY = 86400


@pytest.fixture
async def client(nats_server: NatsServer, aiohttp_client: ClientFactory) -> EdgeClient:
    return await start_edge(aiohttp_client, edge_settings(nats_server.url))


def visitor_token(*, tenant: str = "shop1", sub: str = "v_returning", role: str = "visitor", exp_in_s: float = 600,
                  secret: str = SECRET, **extra: object) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "tenant": tenant, "role": role, "iat": now - 40 * DAY, "exp": int(now + exp_in_s),
                       **extra}, secret, algorithm="HS256")


async def take(client: EdgeClient, tenant: str = "shop1", token: str | None = None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = await client.post("/v1/widget/token", json={"tenant": tenant}, headers=headers)
    return response.status, await response.json()


async def test_widget_token_is_a_fresh_visitor_token_without_any_credentials(client: EdgeClient) -> None:
    response = await client.post("/v1/widget/token", json={"tenant": "shop1"})
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert re.fullmatch(r"v_[A-Za-z0-9_-]{22}", body["visitor_id"]) and body["expires_in"] == DAY
    principal = JwtVerifier(client.app[keys.SETTINGS]).verify(body["token"])
    assert (principal.tenant, principal.subject, principal.role) == ("shop1", body["visitor_id"], "visitor")
    claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == DAY
    # A real token of a visitor: accepted by the edge, and still only a visitor's.
    staff_only = await client.get("/v1/canned-replies", headers={"Authorization": f"Bearer {body['token']}"})
    await expect_error(staff_only, 403, "forbidden")
    _, other = await take(client)
    assert other["visitor_id"] != body["visitor_id"]


async def test_widget_token_only_for_enabled_tenants(client: EdgeClient) -> None:
    await expect_error(await client.post("/v1/widget/token", json={"tenant": "shop3"}), 403, "tenant_not_enabled")


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b'{"tenant": 7}', 422, "invalid_request"),
    (b"{}", 422, "invalid_request"),
    (b'{"tenant": "shop1", "visitor_id": "v_chosen_by_me"}', 422, "invalid_request"),
    (b'{"tenant": "shop 1"}', 422, "invalid_request"),
    (b'{"tenant": "' + b"s" * 65 + b'"}', 422, "invalid_request"),
    (b'{"tenant": "shop1", "pad": "' + b"x" * 5000 + b'"}', 413, "body_too_large"),
])
async def test_widget_token_refuses_bad_bodies(client: EdgeClient, body: bytes, status: int, code: str) -> None:
    response = await client.post("/v1/widget/token", data=body, headers={"Content-Type": "application/json"})
    await expect_error(response, status, code)


async def test_widget_token_renews_the_same_visitor(client: EdgeClient) -> None:
    _, first = await take(client)
    status, renewed = await take(client, token=str(first["token"]))
    assert status == 200 and renewed["visitor_id"] == first["visitor_id"] and renewed["token"]
    # Expired, but less than 30 days ago: a return visit continues as the same visitor.
    status, returning = await take(client, token=visitor_token(sub="v_back_after_weeks", exp_in_s=-29 * DAY))
    assert status == 200 and returning["visitor_id"] == "v_back_after_weeks"


@pytest.mark.parametrize("token", [
    pytest.param(visitor_token(secret="another-secret-that-is-long-enough-for-hs256"), id="forged"),
    pytest.param(visitor_token(exp_in_s=-31 * DAY), id="expired-over-30-days"),
    pytest.param(visitor_token(tenant="shop2"), id="other-tenant"),
    pytest.param(visitor_token(role="agent"), id="agent-token"),
    pytest.param(visitor_token(role="admin"), id="admin-token"),
    pytest.param(jwt.encode({"sub": "v_x", "tenant": "shop1", "role": "visitor", "exp": int(time.time()) + 60},
                            "", algorithm="none"), id="alg-none"),
    pytest.param(jwt.encode({"sub": "v_x", "tenant": "shop1", "role": "visitor"}, SECRET, algorithm="HS256"),
                 id="no-exp"),
    pytest.param(visitor_token(iat=int(time.time()) + DAY), id="issued-in-the-future"),
    pytest.param("not-a-jwt", id="garbage"),
])
async def test_widget_token_renewal_refuses_other_tokens(client: EdgeClient, token: str) -> None:
    response = await client.post("/v1/widget/token", json={"tenant": "shop1"},
                                 headers={"Authorization": f"Bearer {token}"})
    await expect_error(response, 401, "unauthorized")


async def test_widget_token_renewal_needs_a_bearer_scheme(client: EdgeClient) -> None:
    response = await client.post("/v1/widget/token", json={"tenant": "shop1"},
                                 headers={"Authorization": "Basic dXNlcjpwYXNz"})
    await expect_error(response, 401, "unauthorized")


async def test_widget_token_is_rate_limited_per_address(nats_server: NatsServer,
                                                        aiohttp_client: ClientFactory) -> None:
    client = await start_edge(aiohttp_client, edge_settings(nats_server.url, widget_token_rps=0.01,
                                                            widget_token_burst=2))
    assert [(await take(client))[0] for _ in range(2)] == [200, 200]
    limited = await client.post("/v1/widget/token", json={"tenant": "shop1"})
    await expect_error(limited, 429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1 and limited.headers["RateLimit-Limit"] == "2"
    # The limit comes before anything else: even a bad body or another tenant gets 429 now.
    await expect_error(await client.post("/v1/widget/token", data=b"{"), 429, "rate_limited")
    # The console login has its own bucket per address.
    login = await client.post("/v1/console/login", json={"tenant": "shop1", "username": "nobody", "password": "x"})
    await expect_error(login, 401, "invalid_credentials")


async def test_widget_token_needs_the_shared_secret(nats_server: NatsServer, aiohttp_client: ClientFactory,
                                                    tmp_path: Path) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    client = await start_edge(aiohttp_client, edge_settings(nats_server.url, jwt_secret="",
                                                            jwt_public_key_file=key_file))
    await expect_error(await client.post("/v1/widget/token", json={"tenant": "shop1"}), 503, "not_configured")


async def test_widget_token_refused_to_blacklisted_address_and_visitor(client: EdgeClient) -> None:
    _, kept = await take(client)
    # shop2 blocks this client's address; shop1 blocks one visitor id.
    blocked = await client.post("/v1/blacklist", json={"address": "127.0.0.0/8", "reason": "spam"},
                                headers=bearer(tenant="shop2"))
    assert blocked.status == 201
    assert (await client.post("/v1/blacklist", json={"visitor_id": kept["visitor_id"]}, headers=bearer())).status == 201

    async def address_blocked() -> bool:
        return (await take(client, tenant="shop2"))[0] == 403

    await eventually(address_blocked, what="the blacklist copy picks up the address")
    await expect_error(await client.post("/v1/widget/token", json={"tenant": "shop2"}), 403, "blocked")

    async def visitor_blocked() -> bool:
        return (await take(client, token=str(kept["token"])))[0] == 403

    await eventually(visitor_blocked, what="the blacklist copy picks up the visitor")
    # Only that visitor of shop1, and only shop2 blocks the address.
    status, fresh = await take(client)
    assert status == 200 and fresh["visitor_id"] != kept["visitor_id"]
