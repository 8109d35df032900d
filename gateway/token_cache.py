"""Recently verified bearer tokens, so a token sent again and again is not checked in full every time."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from gateway.auth import Principal

TRUST_S = 10.0
"""How long a verification is reused: a key removed from the JWKS file stops working within this."""
MAX_ENTRIES = 10_000
"""Tokens remembered (~250 bytes each: a digest, the principal, a deadline); least recently used go first."""


class Verifier(Protocol):
    def verify(self, token: str) -> Principal: ...


class VerifiedTokens:
    """Issue 17: a flood with one valid token spent about half of each refused request in PyJWT (its
    base64 and per-character checks). A verified token is remembered by its BLAKE2b digest until its own
    `exp` or TRUST_S, whichever comes first; failures are never remembered (every one is checked in full,
    and an attacker's garbage is new each time anyway). Whether an account was disabled or a visitor
    blocked is asked after this, on every request, as before."""

    def __init__(self, verifier: Verifier, *, trust_s: float = TRUST_S, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self._verifier = verifier
        self._trust_s = trust_s
        self._max_entries = max_entries
        self._clock = clock
        """Wall-clock seconds, as `exp` is."""
        self._entries: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def verify(self, token: str) -> Principal:
        """The token's principal, or the verifier's Unauthorized."""
        digest = hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        now = self._clock()
        entry = self._entries.get(digest)
        if entry is not None:
            principal, until = entry
            if now < until:
                self._entries.move_to_end(digest)
                return principal
            del self._entries[digest]
        principal = self._verifier.verify(token)
        expires = _expiry(token)
        if expires is not None and now < expires:
            self._entries[digest] = (principal, min(expires, now + self._trust_s))
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return principal


def _expiry(token: str) -> float | None:
    """`exp` of a token the verifier has just accepted (so its payload is well formed); None if unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
