"""POST /v1/widget/token: an anonymous visitor token for the chat widget, renewable for the same visitor.

A renewal carries the chain's first issue time (`orig_iat`) forward; a chain older than
KEFU_VISITOR_MAX_LIFETIME_S renews no more (issue 17: a visitor token renewed forever), so a
leaked token stops working at the latest that long after the visitor first came.
"""

from __future__ import annotations

import ipaddress
import math
import secrets
import time
from dataclasses import dataclass

import jwt
import pydantic
from aiohttp import web

from gateway import keys
from gateway.auth import REQUIRED_CLAIMS, bearer_token
from gateway.bodies import read_json_body
from gateway.errors import ApiError, Unauthorized
from gateway.ratelimit import TokenBucketLimiter
from gateway.responses import json_response
from gateway.settings import GatewaySettings

TENANT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
RENEW_GRACE_S = 30 * 86400
"""A visitor token renews the same visitor up to this long after its expiry."""
VISITOR_ID_PREFIX = "v_"
MAX_SUBJECT_CHARS = 256
WIDGET_TOKEN = "widget_token"
CONSOLE_LOGIN = "console_login"
"""Names of the per-address buckets in app[keys.ADDRESS_LIMITS]."""
NO_STORE = {"Cache-Control": "no-store"}


class WidgetTokenBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    tenant: str = pydantic.Field(min_length=1, max_length=64, pattern=TENANT_PATTERN)


def address_limiters(settings: GatewaySettings) -> dict[str, TokenBucketLimiter]:
    """One bucket per client address for each public route (KEFU_WIDGET_TOKEN_RPS / _BURST)."""
    return {name: TokenBucketLimiter(settings.widget_token_rps, settings.widget_token_burst)
            for name in (WIDGET_TOKEN, CONSOLE_LOGIN)}


def client_address(request: web.Request) -> str:
    """The visitor's address: the peer's, or behind KEFU_TRUSTED_PROXIES the one they forwarded."""
    return request.app[keys.CLIENT_ADDRESSES].of(request)


def address_key(address: str) -> str:
    """The key of a client address in per-address buckets."""
    # An IPv6 host usually holds a whole /64: one bucket for all of it.
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip)


def take_address_token(request: web.Request, route: str) -> None:
    """429 `rate_limited` when this client address has used up its bucket for `route`."""
    decision = request.app[keys.ADDRESS_LIMITS][route].take(address_key(client_address(request)))
    if not decision.allowed:
        request.app[keys.METRICS].rate_limited.labels("address").inc()
        raise ApiError("rate_limited", "too many requests from this address", 429, headers={
            "Retry-After": str(decision.retry_after_s), "RateLimit-Limit": str(decision.limit),
            "RateLimit-Remaining": "0", "RateLimit-Reset": str(decision.reset_s)})


def require_hs256(settings: GatewaySettings) -> None:
    """The edge signs these tokens itself: only when it verifies HS256 with KEFU_JWT_SECRET."""
    if not settings.jwt_secret or settings.jwt_public_key_file is not None or settings.jwt_jwks_file is not None:
        raise ApiError("not_configured", "this edge does not sign tokens: it needs KEFU_JWT_SECRET and no "
                       "KEFU_JWT_PUBLIC_KEY_FILE / KEFU_JWT_JWKS_FILE", 503)


def sign_token(settings: GatewaySettings, *, tenant: str, subject: str, role: str, ttl_s: int,
               name: str = "", orig_iat: int | None = None, now: int | None = None) -> str:
    now = int(time.time()) if now is None else now
    claims: dict[str, object] = {"sub": subject, "tenant": tenant, "role": role, "iat": now, "exp": now + ttl_s}
    if name:
        claims["name"] = name
    if orig_iat is not None:
        claims["orig_iat"] = orig_iat
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")


@dataclass(frozen=True, slots=True)
class Visitor:
    visitor_id: str
    orig_iat: int
    """When the visitor's first token was issued: the start of its renewal chain."""


def renewed_visitor(settings: GatewaySettings, authorization: str, tenant: str) -> Visitor:
    """The visitor of a previous visitor token of `tenant`, verified as strictly as any token except
    that it may have expired up to RENEW_GRACE_S ago, and its chain started at most
    KEFU_VISITOR_MAX_LIFETIME_S ago; 401 otherwise."""
    token = bearer_token(authorization)
    try:
        claims = jwt.decode(
            token, settings.jwt_secret, algorithms=["HS256"], leeway=settings.jwt_leeway_s,
            issuer=settings.jwt_issuer or None, audience=settings.jwt_audience or None,
            options={"require": REQUIRED_CLAIMS, "verify_exp": False, "verify_aud": bool(settings.jwt_audience)})
    except jwt.MissingRequiredClaimError as error:
        raise Unauthorized(f"token lacks the {error.claim!r} claim") from None
    except (jwt.PyJWTError, UnicodeError):
        raise Unauthorized("invalid token") from None
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise Unauthorized("claim 'exp' must be a number")
    if time.time() > exp + RENEW_GRACE_S + settings.jwt_leeway_s:
        raise Unauthorized("token expired too long ago to renew; get a new one without Authorization")
    subject = claims["sub"]
    if claims["role"] != "visitor" or claims["tenant"] != tenant:
        raise Unauthorized("only a visitor token of the same tenant renews")
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS:
        raise Unauthorized(f"claim 'sub' must be a string of 1-{MAX_SUBJECT_CHARS} characters")
    # Tokens from before chains were capped have no orig_iat: their own iat (or exp) starts the chain.
    started = claims.get("orig_iat", claims.get("iat", exp - settings.widget_token_ttl_s))
    if isinstance(started, bool) or not isinstance(started, int | float) or not math.isfinite(started):
        raise Unauthorized("claim 'orig_iat' must be a number")
    if time.time() - started > settings.visitor_max_lifetime_s:
        raise Unauthorized(f"this visitor's tokens were first issued more than {settings.visitor_max_lifetime_s} s "
                           "ago and renew no more; get a new one without Authorization")
    return Visitor(subject, int(started))


def new_visitor_id() -> str:
    return VISITOR_ID_PREFIX + secrets.token_urlsafe(16)  # 22 characters, 128 random bits


async def widget_token(request: web.Request) -> web.Response:
    take_address_token(request, WIDGET_TOKEN)
    body = await read_json_body(request, WidgetTokenBody)
    settings = request.app[keys.SETTINGS]
    if body.tenant not in settings.widget_tenants:
        raise ApiError("tenant_not_enabled", "this tenant does not offer the chat widget", 403)
    require_hs256(settings)
    authorization = request.headers.get("Authorization", "")
    now = int(time.time())
    visitor = renewed_visitor(settings, authorization, body.tenant) if authorization \
        else Visitor(new_visitor_id(), now)
    if request.app[keys.BLACKLIST].blocks(body.tenant, visitor.visitor_id, client_address(request)):
        raise ApiError("blocked", "this visitor may not chat with this tenant", 403)
    # The last token of a chain ends with the chain.
    ttl_s = max(1, min(settings.widget_token_ttl_s, visitor.orig_iat + settings.visitor_max_lifetime_s - now))
    token = sign_token(settings, tenant=body.tenant, subject=visitor.visitor_id, role="visitor", ttl_s=ttl_s,
                       orig_iat=visitor.orig_iat, now=now)
    return json_response({"token": token, "visitor_id": visitor.visitor_id, "expires_in": ttl_s}, headers=NO_STORE)
