"""Token-bucket rate limits per key, with memory bounded by evicting the least recently seen keys."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
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
