"""VerifiedTokens: a verified token is reused until its exp or TRUST_S; failures and changes are never reused."""

from __future__ import annotations

import time

import pytest

from devtools.mint_token import mint
from gateway.auth import JwtVerifier, Principal
from gateway.errors import Unauthorized
from gateway.settings import GatewaySettings
from gateway.token_cache import TRUST_S, VerifiedTokens

SECRET = "token-cache-test-" + "x" * 32


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class CountingVerifier:
    def __init__(self, secret: str = SECRET) -> None:
        self.inner = JwtVerifier(GatewaySettings(jwt_secret=secret, jwt_leeway_s=0))
        self.calls = 0

    def verify(self, token: str) -> Principal:
        self.calls += 1
        return self.inner.verify(token)


def test_token_cache_verifies_a_token_once_within_its_trust_window() -> None:
    clock, verifier = Clock(), CountingVerifier()
    tokens = VerifiedTokens(verifier, clock=clock)
    token = mint(SECRET, tenant="shop1", subject="v1", role="visitor", ttl_s=600)
    first = tokens.verify(token)
    assert all(tokens.verify(token) == first for _ in range(100))
    assert verifier.calls == 1 and first.subject == "v1" and first.tenant == "shop1"
    clock.now += TRUST_S + 0.1
    assert tokens.verify(token) == first and verifier.calls == 2


def test_token_cache_never_outlives_the_tokens_exp() -> None:
    clock, verifier = Clock(), CountingVerifier()
    tokens = VerifiedTokens(verifier, clock=clock, trust_s=3600)
    token = mint(SECRET, tenant="shop1", subject="v1", role="visitor", ttl_s=60)
    tokens.verify(token)
    tokens.verify(token)
    assert verifier.calls == 1
    clock.now += 61  # past exp (by the cache's clock): the verifier decides again, whatever the trust window
    tokens.verify(token)
    assert verifier.calls == 2


def test_token_cache_never_remembers_a_failure_nor_lets_another_token_pass() -> None:
    clock, verifier = Clock(), CountingVerifier()
    tokens = VerifiedTokens(verifier, clock=clock)
    forged = mint("another-secret-" + "y" * 32, tenant="shop1", subject="v1", role="visitor", ttl_s=600)
    for _ in range(3):
        with pytest.raises(Unauthorized):
            tokens.verify(forged)
    assert verifier.calls == 3 and len(tokens) == 0
    good = mint(SECRET, tenant="shop1", subject="v1", role="visitor", ttl_s=600)
    tokens.verify(good)
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    with pytest.raises(Unauthorized):
        tokens.verify(tampered)


def test_token_cache_is_bounded() -> None:
    clock, verifier = Clock(), CountingVerifier()
    tokens = VerifiedTokens(verifier, clock=clock, max_entries=5)
    for n in range(50):
        tokens.verify(mint(SECRET, tenant="shop1", subject=f"v{n}", role="visitor", ttl_s=600))
    assert len(tokens) == 5
