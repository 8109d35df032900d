"""Request id, JSON errors, authentication and rate limits, in that order around every handler."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from gateway.responses import json_response
from gateway import keys
from gateway.auth import bearer_token
from gateway.errors import ApiError, BodyTooLarge, api_error_from_grpc
from gateway.openai_format import OPENAI_PATHS
from gateway.openai_format import error_body as openai_error_body
from services.common.logs import request_id_var

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


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
        response = error_response(ApiError(code, error.reason, error.status), request_id, request.path)
    except grpc.aio.AioRpcError as error:
        response = error_response(api_error_from_grpc(error, "backend"), request_id, request.path)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(ApiError("internal", "internal error"), request_id, request.path)
    if not response.prepared:  # streams set the header themselves before their first byte
        response.headers["X-Request-Id"] = request_id
    request.app[keys.METRICS].request_seconds.labels(route, str(response.status)).observe(
        time.perf_counter() - start)
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /v1/* route needs a verified JWT; then the principal's and tenant's buckets."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    principal = request.app[keys.VERIFIER].verify(bearer_token(request.headers.get("Authorization")))
    request[keys.REQUEST_PRINCIPAL] = principal
    for scope, limiter, key in (("principal", request.app[keys.PRINCIPAL_LIMITER], principal.key),
                                ("tenant", request.app[keys.TENANT_LIMITER], principal.tenant)):
        decision = limiter.take(key)
        if not decision.allowed:
            request.app[keys.METRICS].rate_limited.labels(scope).inc()
            raise ApiError("rate_limited", f"too many requests for this {scope}", 429, headers={
                "Retry-After": str(decision.retry_after_s), "RateLimit-Limit": str(decision.limit),
                "RateLimit-Remaining": "0", "RateLimit-Reset": str(decision.reset_s)})
    return await handler(request)
