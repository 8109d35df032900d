"""Visitors this edge refuses for a while without asking any backend: over their message rate (until
its Retry-After), or just closed for a frame flood (issue 17: a flood costs a JWT check, not a gRPC call)."""

from __future__ import annotations

import time

from gateway.auth import Principal

MAX_HOLDS = 100_000


class VisitorHolds:
    """Visitors refused on this edge until a moment (monotonic), with memory bounded under a flood."""

    def __init__(self, max_entries: int = MAX_HOLDS) -> None:
        self._until: dict[tuple[str, str], float] = {}
        self._max_entries = max_entries

    def hold(self, principal: Principal, seconds: float) -> None:
        now = time.monotonic()
        if len(self._until) >= self._max_entries:  # many visitors at once: forget the ones already free
            self._until = {key: until for key, until in self._until.items() if until > now}
        if len(self._until) < self._max_entries:
            self._until[(principal.tenant, principal.subject)] = now + seconds

    def held_for(self, principal: Principal) -> float:
        """Seconds until the visitor is free again (0: not held)."""
        key = (principal.tenant, principal.subject)
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self._until[key]
            return 0.0
        return left
