"""Token-bucket rate limits per key, with memory bounded by evicting the least recently seen keys."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    """Seconds until the bucket is full again."""
    retry_after_s: int
    """Seconds until one request is allowed (0 when allowed)."""


class TokenBucketLimiter:
    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> Decision:
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        self._buckets[key] = bucket
        if len(self._buckets) > self._max_keys:
            # An idle bucket refills to full, so forgetting the least recent one loses nothing.
            self._buckets.popitem(last=False)
        allowed = bucket.tokens >= 1
        if allowed:
            bucket.tokens -= 1
        reset = math.ceil((self.burst - bucket.tokens) / self.rate)
        retry = 0 if allowed else max(1, math.ceil((1 - bucket.tokens) / self.rate))
        return Decision(allowed, self.burst, int(bucket.tokens), reset, retry)

    def peek(self, key: str) -> Decision:
        """What take(key) would decide now, without taking a token or remembering the key."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return Decision(True, self.burst, self.burst, 0, 0)
        tokens = min(self.burst, bucket.tokens + (self._clock() - bucket.updated) * self.rate)
        allowed = tokens >= 1
        reset = math.ceil((self.burst - tokens) / self.rate)
        retry = 0 if allowed else max(1, math.ceil((1 - tokens) / self.rate))
        return Decision(allowed, self.burst, int(tokens), reset, retry)

    def give_back(self, key: str) -> None:
        """Return one token taken for `key` (a charge that turned out not to count, e.g. a login that succeeded)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(float(self.burst), bucket.tokens + 1)


@dataclass(frozen=True, slots=True)
class Refusal:
    scope: str
    """"principal" or "tenant": whose bucket is empty."""
    decision: Decision


class EdgeRateLimits:
    """A bucket per (route, principal) and per tenant, with per-route and per-tenant rates.

    Buckets live in this process only: with N edge replicas a tenant's effective limit is
    N times the configured one.
    """

    def __init__(self, principal_rps: float, principal_burst: int, tenant_rps: float, *,
                 routes: Mapping[str, tuple[float, int]] | None = None, tenants: Mapping[str, float] | None = None,
                 max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._principal_default = (principal_rps, principal_burst)
        self._route_rates = dict(routes or {})
        self._tenant_rates = dict(tenants or {})
        self._max_keys = max_keys
        self._clock = clock
        self._per_route: dict[str, TokenBucketLimiter] = {}
        self._tenant_default = TokenBucketLimiter(tenant_rps, _burst_for(tenant_rps), max_keys=max_keys, clock=clock)
        self._per_tenant = {tenant: TokenBucketLimiter(rps, _burst_for(rps), max_keys=1, clock=clock)
                            for tenant, rps in self._tenant_rates.items()}

    def take(self, route: str, principal_key: str, tenant: str) -> Refusal | None:
        limiter = self._per_route.get(route)
        if limiter is None:
            rps, burst = self._route_rates.get(route, self._principal_default)
            limiter = self._per_route[route] = TokenBucketLimiter(rps, burst, max_keys=self._max_keys,
                                                                  clock=self._clock)
        decision = limiter.take(principal_key)
        if not decision.allowed:
            return Refusal("principal", decision)
        decision = self._per_tenant.get(tenant, self._tenant_default).take(tenant)
        if not decision.allowed:
            return Refusal("tenant", decision)
        return None

    def tracked_keys(self) -> int:
        return sum(len(limiter) for limiter in self._per_route.values()) + len(self._tenant_default)


def _burst_for(rps: float) -> int:
    return max(1, int(rps * 2))
