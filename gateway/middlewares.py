"""Request id, JSON errors, authentication and rate limits, in that order around every handler."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from gateway import keys
from gateway.auth import Principal, bearer_token, require_role
from gateway.errors import ApiError, BodyTooLarge, Unauthorized, api_error_from_grpc
from gateway.openai_format import OPENAI_PATHS
from gateway.openai_format import error_body as openai_error_body
from gateway.responses import json_response
from services.common.logs import request_id_var

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
WS_PATH = "/v1/ws"
"""Authenticates in its handler: a browser cannot set headers on a WebSocket and sends its token in a frame."""
PUBLIC_API_PATHS = frozenset({"/v1/widget/token", "/v1/console/login"})
"""Under /v1/ but without a JWT: they hand tokens out (rate limited per client address in their handlers)."""


def error_response(error: ApiError, request_id: str, path: str = "") -> web.Response:
    body = (openai_error_body(error, request_id) if path in OPENAI_PATHS
            else {"error": {"code": error.code, "message": error.message, "request_id": request_id}})
    return json_response(body, status=error.status, headers=error.headers)


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id in, X-Request-Id out, errors as JSON, one duration observation per request."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _CLIENT_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    request[keys.REQUEST_ID] = request_id
    request_id_var.set(request_id)
    start = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except ApiError as error:
        response = error_response(error, request_id, request.path)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(BodyTooLarge(None, request.app[keys.SETTINGS].max_body_bytes), request_id,
                                  request.path)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status, "http_error")
        allow = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        response = error_response(ApiError(code, error.reason, error.status, headers=allow), request_id,
                                  request.path)
    except grpc.aio.AioRpcError as error:
        response = error_response(api_error_from_grpc(error, "backend"), request_id, request.path)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(ApiError("internal", "internal error"), request_id, request.path)
    if not response.prepared:  # streams set the header themselves before their first byte
        response.headers["X-Request-Id"] = request_id
    guard = request.app.get(keys.CONNECTION_GUARD)
    if guard is not None and request.transport is not None:
        if response.status != 429:
            guard.served(request.transport)
        elif guard.refused(request.transport, request.remote or ""):
            # Refused too often in a row: close this keep-alive connection; the address's next ones are
            # closed at accept until its penalty window ends (gateway/connection_guard.py).
            response.force_close()
    request.app[keys.METRICS].request_seconds.labels(route, str(response.status)).observe(
        time.perf_counter() - start)
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /v1/* route needs a verified JWT with a role the route accepts, no blacklisted visitor, then
    room in its buckets."""
    if not request.path.startswith("/v1/") or request.path == WS_PATH:
        return await handler(request)
    if request.app[keys.STATE].is_draining:
        raise ApiError("draining", "this edge is shutting down; retry on another", 503,
                       headers={"Retry-After": "1", "Connection": "close"})
    if request.path in PUBLIC_API_PATHS:
        return await handler(request)
    principal = request.app[keys.VERIFIED_TOKENS].verify(bearer_token(request.headers.get("Authorization")))
    accounts = request.app.get(keys.ACCOUNT_STATUS)
    if accounts is not None and await accounts.disabled(principal):
        raise Unauthorized("this account is disabled")
    request[keys.REQUEST_PRINCIPAL] = principal
    if request.match_info.http_exception is not None:
        return await handler(request)  # 404/405: the method or path is wrong, whatever the role
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    roles = request.app[keys.ROUTE_ROLES].get(route)
    if roles is not None:
        require_role(principal, roles)
    refuse_blocked_visitor(request, principal)
    refusal = request.app[keys.RATE_LIMITS].take(route, principal.key, principal.tenant)
    if refusal is not None:
        request.app[keys.METRICS].rate_limited.labels(refusal.scope).inc()
        decision = refusal.decision
        raise ApiError("rate_limited", f"too many requests for this {refusal.scope}", 429, headers={
            "Retry-After": str(decision.retry_after_s), "RateLimit-Limit": str(decision.limit),
            "RateLimit-Remaining": "0", "RateLimit-Reset": str(decision.reset_s)})
    return await handler(request)


def refuse_blocked_visitor(request: web.Request, principal: Principal) -> None:
    """403 `blocked` (as for a widget token) when the tenant's blacklist names this visitor or its address.

    Issue 17: a visitor blocked after it got its token kept chatting over HTTP until the token expired.
    `Blacklist.blocks` reads the watched in-memory copy (the WebSocket's check), so this costs no NATS
    call; an entry added or lifted on any edge applies here as soon as the KV watch delivers it.
    """
    if not principal.is_visitor:
        return
    blacklist = request.app.get(keys.BLACKLIST)
    if blacklist is not None and blacklist.blocks(principal.tenant, principal.subject,
                                                  request.app[keys.CLIENT_ADDRESSES].of(request)):
        raise ApiError("blocked", "this visitor may not chat with this tenant", 403)


CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Request-Id, X-Session-Id"
CORS_EXPOSE_HEADERS = "X-Request-Id, X-Session-Id, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset"


def allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin", "")
    allowed = request.app[keys.SETTINGS].cors_origins
    if not origin or not allowed:
        return None
    if "*" in allowed or origin in allowed:
        return origin
    return None


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights for allowed origins (before auth: a preflight carries no token)."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        origin = allowed_origin(request)
        if origin is None:
            return web.Response(status=403)
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS, "Access-Control-Max-Age": "600"})
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for plain and streamed responses alike, before the first byte."""
    origin = allowed_origin(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
        response.headers.add("Vary", "Origin")
