"""The edge's answers to bad requests: strict auth, size, media type, JSON, schema; never a 500."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import jwt
import pytest
from aiohttp import ClientResponse, web
from prometheus_client import generate_latest

from devtools.devstack.stack import free_port
from devtools.mint_token import mint
from gateway import keys
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.gateway.live_http_support import EdgeClient

SECRET = "test-secret-that-is-long-enough-for-hs256"
ClientFactory = Callable[[web.Application], Awaitable[EdgeClient]]


def settings(**overrides: object) -> GatewaySettings:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: backends are unreachable
    values: dict[str, object] = {"jwt_secret": SECRET, "max_body_bytes": 4096, "session_addr": dead,
                                 "moderation_addr": dead, "worker_addr": dead, "rpc_timeout_s": 1.0}
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]  # overrides of any field


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def good_token(**claims: object) -> str:
    return mint(SECRET, tenant=str(claims.get("tenant", "shop1")), subject="alice",
                role=str(claims.get("role", "visitor")))


@pytest.fixture
async def client(aiohttp_client: ClientFactory) -> EdgeClient:
    return await aiohttp_client(create_app(settings()))


async def assert_error(response: ClientResponse, status: int, code: str) -> None:
    assert response.status == status
    body = await response.json()
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == response.headers["X-Request-Id"]


@pytest.mark.parametrize("token", [
    pytest.param(jwt.encode({"sub": "a", "tenant": "t", "role": "visitor", "exp": int(time.time()) + 60},
                            "some-other-secret-of-sufficient-length", algorithm="HS256"), id="bad-signature"),
    pytest.param(jwt.encode({"sub": "a", "tenant": "t", "role": "visitor", "exp": int(time.time()) - 3600},
                            SECRET, algorithm="HS256"), id="expired"),
    pytest.param(jwt.encode({"sub": "a", "tenant": "t", "role": "visitor", "exp": int(time.time()) + 60},
                            "", algorithm="none"), id="alg-none"),
    pytest.param(jwt.encode({"sub": "a", "role": "visitor", "exp": int(time.time()) + 60},
                            SECRET, algorithm="HS256"), id="missing-tenant"),
    pytest.param(jwt.encode({"sub": "a", "tenant": "t", "role": "root", "exp": int(time.time()) + 60},
                            SECRET, algorithm="HS256"), id="unknown-role"),
    pytest.param("not-a-jwt", id="garbage"),
])
async def test_edge_rejects_bad_tokens_with_401_json(client: EdgeClient, token: str) -> None:
    response = await client.post("/v1/chat", json={"message": "hi"}, headers=bearer(token))
    await assert_error(response, 401, "unauthorized")


async def test_edge_missing_authorization_is_401(client: EdgeClient) -> None:
    await assert_error(await client.post("/v1/chat", json={"message": "hi"}), 401, "unauthorized")


async def test_edge_body_over_limit_is_413(client: EdgeClient) -> None:
    response = await client.post("/v1/chat", data=b'{"message": "' + b"x" * 5000 + b'"}',
                                 headers={**bearer(good_token()), "Content-Type": "application/json"})
    await assert_error(response, 413, "body_too_large")


async def test_edge_body_over_limit_without_length_is_413(client: EdgeClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # chunked upload: no Content-Length to refuse early
        for _ in range(10):
            yield b"x" * 1000

    response = await client.post("/v1/chat", data=chunks(),
                                 headers={**bearer(good_token()), "Content-Type": "application/json"})
    await assert_error(response, 413, "body_too_large")


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe{}", b'{"message": "unterminated', b"[" * 3000])
async def test_edge_body_not_json_is_400(client: EdgeClient, body: bytes) -> None:
    response = await client.post("/v1/chat", data=body,
                                 headers={**bearer(good_token()), "Content-Type": "application/json"})
    await assert_error(response, 400, "invalid_json")


async def test_edge_integer_of_thousands_of_digits_is_400(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(settings(max_body_bytes=65536)))
    response = await client.post("/v1/chat", data=b'{"message": "hi", "n": ' + b"9" * 5000 + b"}",
                                 headers={**bearer(good_token()), "Content-Type": "application/json"})
    await assert_error(response, 400, "invalid_json")


async def test_edge_lone_surrogate_is_422_not_500(client: EdgeClient) -> None:
    response = await client.post("/v1/chat", data=b'{"message": "\\udc00 hi"}',
                                 headers={**bearer(good_token()), "Content-Type": "application/json"})
    await assert_error(response, 422, "invalid_request")


async def test_edge_wrong_method_is_405_with_allow(client: EdgeClient) -> None:
    response = await client.patch("/healthz")
    await assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"].split(",")


@pytest.mark.parametrize("body", [{}, {"message": 42}, {"message": "hi", "stream": "yes"},
                                  {"message": "hi", "surprise": 1}, {"message": "hi", "session_id": "x" * 129},
                                  {"message": "   "}, [1, 2]])
async def test_edge_schema_violations_are_422(client: EdgeClient, body: object) -> None:
    response = await client.post("/v1/chat", json=body, headers=bearer(good_token()))
    await assert_error(response, 422, "invalid_request")


async def test_edge_wrong_media_type_is_415(client: EdgeClient) -> None:
    response = await client.post("/v1/chat", data="message=hi",
                                 headers={**bearer(good_token()), "Content-Type": "text/plain"})
    await assert_error(response, 415, "unsupported_media_type")


async def test_edge_unknown_route_is_json_404(client: EdgeClient) -> None:
    await assert_error(await client.get("/v1/nope", headers=bearer(good_token())), 404, "not_found")


async def test_edge_moderation_unreachable_fails_closed_with_503(client: EdgeClient) -> None:
    response = await client.post("/v1/chat", json={"message": "hi"}, headers=bearer(good_token()))
    await assert_error(response, 503, "moderation_unavailable")


async def test_edge_rate_limit_is_429_with_headers(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(settings(rate_limit_rps=0.5, rate_limit_burst=2)))
    headers = bearer(good_token())
    statuses = [(await client.post("/v1/chat", json={}, headers=headers)).status for _ in range(2)]
    assert statuses == [422, 422]
    response = await client.post("/v1/chat", json={}, headers=headers)
    await assert_error(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["RateLimit-Limit"] == "2" and response.headers["RateLimit-Remaining"] == "0"
    assert int(response.headers["RateLimit-Reset"]) >= 1


async def test_edge_health_and_metrics_are_public(client: EdgeClient) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["backends"]["session"] is False
    await client.post("/v1/chat", json={"message": "hi"})
    # /metrics has its own port (gateway/__main__.py); the public one serves it only when asked to.
    assert (await client.get("/metrics")).status == 404
    metrics = generate_latest(client.app[keys.METRICS].registry).decode()
    assert 'kefu_http_request_duration_seconds_count{route="/v1/chat",status="401"} 1.0' in metrics


async def test_edge_metrics_on_the_public_port_only_when_asked(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(settings(metrics_on_http_port=True)))  # KEFU_METRICS_ON_HTTP_PORT
    await client.post("/v1/chat", json={"message": "hi"})
    metrics = await (await client.get("/metrics")).text()
    assert 'kefu_http_request_duration_seconds_count{route="/v1/chat",status="401"} 1.0' in metrics
