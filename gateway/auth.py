"""JWT verification: a token becomes a Principal, or the request gets 401."""

from __future__ import annotations

import re
from dataclasses import dataclass

import jwt

from gateway.errors import Forbidden, Unauthorized
from gateway.settings import GatewaySettings

ROLES = frozenset({"visitor", "agent", "admin"})
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REQUIRED_CLAIMS = ["sub", "tenant", "role", "exp"]


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    subject: str
    role: str

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.subject}"


class JwtVerifier:
    """HS256 with a shared secret, or RS256/ES256 with a PEM public key; never `none`, never mixed."""

    def __init__(self, settings: GatewaySettings) -> None:
        if settings.jwt_public_key_file is not None:
            # Only asymmetric algorithms with a public key: an HS256 token "signed" with the
            # public key text (algorithm confusion) is refused by the algorithm list.
            self._key: str | bytes = settings.jwt_public_key_file.read_bytes()
            self._algorithms = ["RS256", "ES256"]
        else:
            self._key = settings.jwt_secret
            self._algorithms = ["HS256"]
        self._issuer = settings.jwt_issuer or None
        self._audience = settings.jwt_audience or None
        self._leeway = settings.jwt_leeway_s

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token, self._key, algorithms=self._algorithms, leeway=self._leeway,
                issuer=self._issuer, audience=self._audience,
                options={"require": REQUIRED_CLAIMS, "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.MissingRequiredClaimError as error:
            raise Unauthorized(f"token lacks the {error.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid token") from None
        subject, tenant, role = claims["sub"], claims["tenant"], claims["role"]
        if not isinstance(subject, str) or not 0 < len(subject) <= 256:
            raise Unauthorized("claim 'sub' must be a string of 1-256 characters")
        if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
            raise Unauthorized("claim 'tenant' must be 1-64 letters, digits, '_' or '-'")
        if role not in ROLES:
            raise Unauthorized(f"claim 'role' must be one of {sorted(ROLES)}")
        return Principal(tenant=tenant, subject=subject, role=role)


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer <token>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'")
    return token.strip()


def require_role(principal: Principal, allowed: frozenset[str]) -> None:
    if principal.role not in allowed:
        raise Forbidden(f"role {principal.role!r} may not use this route")
