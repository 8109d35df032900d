"""JWT verification: every algorithm and claim rule, JWKS by kid with reload, algorithm confusion."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth import JwksFile, JwtVerifier, Principal
from gateway.errors import Unauthorized
from gateway.settings import GatewaySettings

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def claims(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {"sub": "alice", "tenant": "shop1", "role": "visitor", "exp": int(time.time()) + 60}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def verifier(tmp_path: Path, **settings: object) -> JwtVerifier:
    return JwtVerifier(GatewaySettings(**settings))  # type: ignore[arg-type]  # overrides of any field


def rejects(v: JwtVerifier, token: str, message: str = "") -> None:
    with pytest.raises(Unauthorized) as error:
        v.verify(token)
    assert message in error.value.message


def test_auth_hs256_accepts_a_good_token(tmp_path: Path) -> None:
    v = verifier(tmp_path, jwt_secret=SECRET)
    assert v.verify(jwt.encode(claims(), SECRET, algorithm="HS256")) == Principal("shop1", "alice", "visitor")


def test_auth_hs256_rejects_what_it_must(tmp_path: Path) -> None:
    v = verifier(tmp_path, jwt_secret=SECRET)
    rejects(v, jwt.encode(claims(), SECRET + "x", algorithm="HS256"), "invalid token")
    rejects(v, jwt.encode(claims(exp=int(time.time()) - 120), SECRET, algorithm="HS256"), "expired")
    rejects(v, jwt.encode(claims(), "", algorithm="none"), "invalid token")
    for missing in ("sub", "tenant", "role", "exp"):
        rejects(v, jwt.encode(claims(**{missing: None}), SECRET, algorithm="HS256"), missing)
    rejects(v, jwt.encode(claims(role="root"), SECRET, algorithm="HS256"), "role")
    rejects(v, jwt.encode(claims(tenant="a b"), SECRET, algorithm="HS256"), "tenant")
    rejects(v, "a.b.c", "invalid token")
    rejects(v, "\udcff\udcfe", "invalid token")  # what aiohttp makes of non-UTF-8 header bytes


def test_auth_api_role_is_known_and_owns_conversations_apart(tmp_path: Path) -> None:
    v = verifier(tmp_path, jwt_secret=SECRET)
    integrator = v.verify(jwt.encode(claims(role="api", sub="erp"), SECRET, algorithm="HS256"))
    assert (integrator.role, integrator.is_visitor) == ("api", False)
    # At the session service it owns its conversations as a visitor would, never a visitor's of the same sub.
    assert integrator.session_caller() == Principal("shop1", "api:erp", "visitor")
    assert v.verify(jwt.encode(claims(sub="erp"), SECRET, algorithm="HS256")).session_caller().subject == "erp"
    assert v.verify(jwt.encode(claims(role="api", sub="x" * 252), SECRET, algorithm="HS256")).subject == "x" * 252
    rejects(v, jwt.encode(claims(role="api", sub="x" * 253), SECRET, algorithm="HS256"), "1-252")


def test_auth_leeway_accepts_small_clock_skew_only(tmp_path: Path) -> None:
    v = verifier(tmp_path, jwt_secret=SECRET, jwt_leeway_s=30)
    assert v.verify(jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256")).subject == "alice"
    rejects(v, jwt.encode(claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"), "expired")


def test_auth_issuer_and_audience_checked_when_configured(tmp_path: Path) -> None:
    v = verifier(tmp_path, jwt_secret=SECRET, jwt_issuer="https://idp.example", jwt_audience="kefu")
    good = claims(iss="https://idp.example", aud="kefu")
    assert v.verify(jwt.encode(good, SECRET, algorithm="HS256")).tenant == "shop1"
    rejects(v, jwt.encode({**good, "iss": "https://evil.example"}, SECRET, algorithm="HS256"))
    rejects(v, jwt.encode({**good, "aud": "other"}, SECRET, algorithm="HS256"))
    rejects(v, jwt.encode(claims(), SECRET, algorithm="HS256"))  # neither claim present


@pytest.mark.parametrize("key,algorithm", [(RSA_KEY, "RS256"), (EC_KEY, "ES256")])
def test_auth_pem_public_key(tmp_path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
                             algorithm: str) -> None:
    (tmp_path / "key.pem").write_bytes(public_pem(key))
    v = verifier(tmp_path, jwt_public_key_file=tmp_path / "key.pem")
    assert v.verify(jwt.encode(claims(), key, algorithm=algorithm)).subject == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048) if algorithm == "RS256" \
        else ec.generate_private_key(ec.SECP256R1())
    rejects(v, jwt.encode(claims(), other, algorithm=algorithm))
    rejects(v, jwt.encode(claims(), "", algorithm="none"))


def test_auth_algorithm_confusion_is_rejected(tmp_path: Path) -> None:
    pem = public_pem(RSA_KEY)
    (tmp_path / "key.pem").write_bytes(pem)
    v = verifier(tmp_path, jwt_public_key_file=tmp_path / "key.pem")
    # An attacker signs HS256 with the public key text as the HMAC secret; PyJWT refuses to
    # produce it with a PEM key, so build it by hand.
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(claims()).encode())
    signature = jwt.utils.base64url_encode(hmac.new(pem, header + b"." + payload, hashlib.sha256).digest())
    rejects(v, (header + b"." + payload + b"." + signature).decode(), "invalid token")


def write_jwks(path: Path, keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]) -> None:
    entries = []
    for kid, key in keys.items():
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        else:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        entries.append({**jwk, "kid": kid, "use": "sig"})
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"keys": entries}))
    temp.replace(path)


def test_auth_jwks_selects_by_kid_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, {"k1": RSA_KEY, "k2": EC_KEY})
    now = [0.0]
    source = JwksFile(path, clock=lambda: now[0])
    v = verifier(tmp_path, jwt_jwks_file=path)
    v._jwks = source  # a controllable clock instead of sleeping past the re-check interval
    assert v.verify(jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "k1"})).role == "visitor"
    assert v.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "k2"})).role == "visitor"
    rejects(v, jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "k2"}))  # wrong key for kid
    rejects(v, jwt.encode(claims(), RSA_KEY, algorithm="RS256"))  # no kid
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_jwks(path, {"k3": rotated})
    os.utime(path, (time.time() + 5, time.time() + 5))
    now[0] += 2
    assert v.verify(jwt.encode(claims(), rotated, algorithm="RS256", headers={"kid": "k3"})).subject == "alice"
    rejects(v, jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "k1"}))
    path.write_text("{not json")  # a broken write keeps the last good keys
    os.utime(path, (time.time() + 10, time.time() + 10))
    now[0] += 2
    assert v.verify(jwt.encode(claims(), rotated, algorithm="RS256", headers={"kid": "k3"})).subject == "alice"
