"""JWT verification: a token becomes a Principal, or the request gets 401."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.errors import Forbidden, Unauthorized
from gateway.settings import GatewaySettings
from services.common.settings import SettingsError

log = logging.getLogger(__name__)

VISITOR = "visitor"
"""Anyone with a widget token: the tenant's system prompt, route and output cap, nothing else."""
API = "api"
"""A server-to-server integrator of the tenant: the full OpenAI surface, no live chat, no staff routes."""
ROLES = frozenset({VISITOR, "agent", "admin", API})
STAFF_ROLES = frozenset({"agent", "admin"})
LIVE_ROLES = frozenset({VISITOR, *STAFF_ROLES})
"""Who may open the live-chat WebSocket (not `api`)."""
API_SUBJECT_PREFIX = "api:"
MAX_SUBJECT_CHARS = 256
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REQUIRED_CLAIMS = ["sub", "tenant", "role", "exp"]


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    subject: str
    role: str
    name: str = ""
    """Optional display name (JWT `name` claim), shown to visitors for agents."""

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.subject}"

    @property
    def is_visitor(self) -> bool:
        return self.role == VISITOR

    def session_caller(self) -> Principal:
        """The caller as the session service knows it. An `api` integrator owns its conversations as a
        visitor does, under subjects of its own (`api:<sub>`), so they never mix with a widget visitor's."""
        if self.role != API:
            return self
        return replace(self, subject=API_SUBJECT_PREFIX + self.subject, role=VISITOR)


MAX_NAME_CHARS = 80
VerifyKey = str | rsa.RSAPublicKey | ec.EllipticCurvePublicKey
"""An HS256 secret, or the public key of an RS256 / ES256 issuer."""


class JwksFile:
    """Public keys from a JWKS file, chosen by the token's `kid`; re-read when the file changes."""

    CHECK_INTERVAL_S = 1.0

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._mtime = -1.0
        self._checked = -1e9
        self._keys: dict[str, tuple[VerifyKey, str]] = {}
        self._load()

    def _load(self) -> None:
        try:
            mtime = self._path.stat().st_mtime
            if mtime == self._mtime:
                return
            keys: dict[str, tuple[VerifyKey, str]] = {}
            for jwk in jwt.PyJWKSet.from_json(self._path.read_text()).keys:
                algorithm = jwk.algorithm_name if jwk.algorithm_name in ASYMMETRIC else _algorithm_of(jwk.key)
                if jwk.key_id and algorithm in ASYMMETRIC:
                    keys[jwk.key_id] = (jwk.key, algorithm)
        except (OSError, ValueError, jwt.PyJWTError) as error:
            # Keep the keys we had: a half-written or broken file must not lock everyone out.
            log.warning("JWKS file %s not (re)loaded: %s", self._path, error)
            return
        self._keys, self._mtime = keys, mtime
        log.info("JWKS: %d keys from %s", len(keys), self._path)

    def key_for(self, header: Mapping[str, object]) -> tuple[VerifyKey, list[str]]:
        now = self._clock()
        if now - self._checked >= self.CHECK_INTERVAL_S:
            self._checked = now
            self._load()
        found = self._keys.get(str(header.get("kid", "")))
        if found is None:
            raise Unauthorized("invalid token")
        return found[0], [found[1]]


ASYMMETRIC = frozenset({"RS256", "ES256"})


def _algorithm_of(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return "ES256"
    return ""


class JwtVerifier:
    """HS256 with a shared secret, or RS256/ES256 with a PEM public key or a JWKS file.

    The algorithm is fixed by the key, never taken from the token: `alg: none` and an
    HS256 token "signed" with the public key text (algorithm confusion) both fail.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self._jwks: JwksFile | None = None
        self._key: VerifyKey = settings.jwt_secret
        self._algorithms = ["HS256"]
        if settings.jwt_jwks_file is not None:
            self._jwks = JwksFile(settings.jwt_jwks_file)
        elif settings.jwt_public_key_file is not None:
            public = serialization.load_pem_public_key(settings.jwt_public_key_file.read_bytes())
            algorithm = _algorithm_of(public)
            if not algorithm or not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                raise SettingsError("KEFU_JWT_PUBLIC_KEY_FILE must hold an RSA or P-256 EC public key")
            self._key = public
            self._algorithms = [algorithm]
        self._issuer = settings.jwt_issuer or None
        self._audience = settings.jwt_audience or None
        self._leeway = settings.jwt_leeway_s

    def verify(self, token: str) -> Principal:
        try:
            key, algorithms = self._key, self._algorithms
            if self._jwks is not None:
                key, algorithms = self._jwks.key_for(jwt.get_unverified_header(token))
            claims = jwt.decode(
                token, key, algorithms=algorithms, leeway=self._leeway,
                issuer=self._issuer, audience=self._audience,
                options={"require": REQUIRED_CLAIMS, "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.MissingRequiredClaimError as error:
            raise Unauthorized(f"token lacks the {error.claim!r} claim") from None
        except (jwt.PyJWTError, UnicodeError):  # bytes that are no text at all: not a token either
            raise Unauthorized("invalid token") from None
        subject, tenant, role = claims["sub"], claims["tenant"], claims["role"]
        # An api subject gets a prefix at the session service (Principal.session_caller): room for it.
        longest = MAX_SUBJECT_CHARS - (len(API_SUBJECT_PREFIX) if role == API else 0)
        if not isinstance(subject, str) or not 0 < len(subject) <= longest:
            raise Unauthorized(f"claim 'sub' must be a string of 1-{longest} characters")
        if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
            raise Unauthorized("claim 'tenant' must be 1-64 letters, digits, '_' or '-'")
        if role not in ROLES:
            raise Unauthorized(f"claim 'role' must be one of {sorted(ROLES)}")
        name = claims.get("name")
        name = name.strip()[:MAX_NAME_CHARS] if isinstance(name, str) else ""
        return Principal(tenant=tenant, subject=subject, role=role, name=name)


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
