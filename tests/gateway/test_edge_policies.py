"""Edge policies without backends: route roles, per-route and per-tenant limits, bounded buckets, CORS, drain."""

from __future__ import annotations

from aiohttp import web

from devtools.mint_token import mint
from gateway import keys
from gateway.app import create_app
from gateway.ratelimit import EdgeRateLimits, TokenBucketLimiter
from gateway.routes import STAFF
from tests.gateway.live_http_support import EdgeClient
from tests.gateway.test_edge_errors import SECRET, ClientFactory, settings


def bearer(role: str = "visitor", tenant: str = "shop1", sub: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(SECRET, tenant=tenant, subject=sub, role=role)}"}


async def staff_probe(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def test_policy_route_roles_are_enforced(aiohttp_client: ClientFactory) -> None:
    app = create_app(settings())
    resource = app.router.add_get("/v1/staff-probe", staff_probe).resource
    assert resource is not None
    app[keys.ROUTE_ROLES][resource.canonical] = STAFF
    client = await aiohttp_client(app)
    denied = await client.get("/v1/staff-probe", headers=bearer("visitor"))
    assert denied.status == 403 and (await denied.json())["error"]["code"] == "forbidden"
    for role in ("agent", "admin"):
        assert (await client.get("/v1/staff-probe", headers=bearer(role))).status == 200


async def test_policy_per_route_limit_and_tenant_override(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(settings(
        route_rate_limits={"/v1/models": (0.01, 1)}, tenant_rate_limits={"tiny": 0.01})))
    assert (await client.get("/v1/models", headers=bearer())).status != 429
    limited = await client.get("/v1/models", headers=bearer())
    assert limited.status == 429 and "RateLimit-Reset" in limited.headers
    # Another route keeps its own (default) bucket for the same principal.
    assert (await client.post("/v1/chat", json={}, headers=bearer())).status == 422
    # A tenant with its own low rate: the second request of any of its users is refused.
    assert (await client.post("/v1/chat", json={}, headers=bearer(tenant="tiny", sub="a"))).status == 422
    second = await client.post("/v1/chat", json={}, headers=bearer(tenant="tiny", sub="b"))
    assert second.status == 429 and "tenant" in (await second.json())["error"]["message"]


def test_policy_buckets_are_bounded_for_millions_of_principals() -> None:
    limiter = TokenBucketLimiter(10, 20, max_keys=1000)
    for i in range(50_000):
        limiter.take(f"tenant/user-{i}")
    assert len(limiter) == 1000
    limits = EdgeRateLimits(10, 20, 1000, max_keys=500)
    for i in range(10_000):
        limits.take("/v1/chat", f"t/u{i}", f"t{i}")
    assert limits.tracked_keys() <= 1000


async def test_policy_cors_preflight_and_headers(aiohttp_client: ClientFactory) -> None:
    client: EdgeClient = await aiohttp_client(create_app(settings(cors_origins=("https://shop.example",))))
    preflight = await client.options("/v1/chat", headers={
        "Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    response = await client.post("/v1/chat", json={}, headers={**bearer(), "Origin": "https://shop.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "X-Request-Id" in response.headers["Access-Control-Expose-Headers"]
    other = await client.options("/v1/chat", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert other.status == 403 and "Access-Control-Allow-Origin" not in other.headers


async def test_policy_draining_edge_refuses_new_work(aiohttp_client: ClientFactory) -> None:
    app = create_app(settings())
    client = await aiohttp_client(app)
    app[keys.STATE].start_draining()
    assert (await client.get("/readyz")).status == 503
    refused = await client.post("/v1/chat", json={"message": "hi"}, headers=bearer())
    assert refused.status == 503 and (await refused.json())["error"]["code"] == "draining"
    assert (await client.get("/healthz")).status == 200
