"""What one visitor or one tenant may store: a message rate per visitor and stored bytes per tenant (issue 17).

Both live in NATS KV, so they hold across every edge and every session replica:
- `kefu_visitor_rates`, key `<tenant>.<sha256(visitor)[:32]>`: a token bucket, taken by CAS against the
  revision this process last wrote (one KV request per visitor message while one replica serves the
  visitor). A key idle long enough to be full again ages out: a missing key is a full bucket.
- `kefu_tenant_usage`, key `<tenant>`: bytes written per time window. Every stored message lives at most
  the log's max age, so the windows covering that age bound the tenant's stored bytes from above (deleting
  a conversation frees its share when its windows age out). Each process adds its bytes every
  FLUSH_S by CAS; checks read this process's view (refreshed every REFRESH_S) plus what it has not
  flushed yet, so replicas overshoot a quota by at most what they store in about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.common.nats_client import ensure_key_value
from services.session.errors import QuotaExceeded, RateLimited

log = logging.getLogger(__name__)

RATES_BUCKET = "kefu_visitor_rates"
USAGE_BUCKET = "kefu_tenant_usage"
CAS_ATTEMPTS = 8
RATES_MAX_BYTES = 64 << 20
"""Memory for the buckets of about 400,000 visitors active within a TTL; beyond it a new visitor's message
is refused (the session answers UNAVAILABLE) rather than nats-server's memory growing without end."""
MAX_CACHED = 65536
WINDOWS = 8
"""Windows per max age of the log: finer windows free aged-out bytes sooner."""
FLUSH_S = 1.0
REFRESH_S = 2.0


@dataclass(frozen=True, slots=True)
class _Bucket:
    tokens: float
    at: float
    revision: int
    """KV revision of the key as this process last saw it; 0: no key (a full bucket); ASSUMED: not read."""


ASSUMED = -1
"""A visitor this process does not know: most likely a new one, whose missing key is a full bucket. The
first take writes without reading (one round trip instead of two) and reads only if a key was there."""


class VisitorRates:
    """A token bucket per visitor (tenant and JWT `sub`) shared by every session replica."""

    def __init__(self, kv: KeyValue, rate: float, burst: int) -> None:
        self._kv = kv
        self._rate = rate
        self._burst = burst
        self._seen: OrderedDict[str, _Bucket] = OrderedDict()

    @classmethod
    async def open(cls, nc: NatsClient, rate: float, burst: int, *, replicas: int = 1) -> VisitorRates:
        # A bucket refills in burst/rate seconds; a key idle for longer says nothing a missing one does not.
        ttl = max(60.0, math.ceil(burst / rate) * 2)
        kv = await ensure_key_value(nc.jetstream(), KeyValueConfig(
            bucket=RATES_BUCKET, history=1, ttl=ttl, storage=StorageType.MEMORY, replicas=replicas,
            max_bytes=RATES_MAX_BYTES))
        return cls(kv, rate, burst)

    async def take(self, tenant: str, visitor: str) -> None:
        """One message's token; RateLimited (with the seconds until the next one) when there is none."""
        key = f"{tenant}.{hashlib.sha256(visitor.encode()).hexdigest()[:32]}"
        assume = key not in self._seen
        for _ in range(CAS_ATTEMPTS):
            seen = self._seen.pop(key, None)
            if seen is None:
                seen = _Bucket(float(self._burst), time.time(), ASSUMED) if assume else await self._read(key)
                assume = False
            now = time.time()
            tokens = min(float(self._burst), seen.tokens + max(0.0, now - seen.at) * self._rate)
            if tokens < 1:
                # Others only ever take tokens: a stale view has more than the truth, so this refusal stands.
                self._remember(key, seen)
                raise RateLimited(max(1, math.ceil((1 - tokens) / self._rate)))
            value = json.dumps({"tokens": tokens - 1, "at": now}).encode()
            try:
                if seen.revision == ASSUMED:
                    # Expects no message at all under the key (create() would also read to tell a
                    # live key from a deleted one): a key there, live or not, is read next round.
                    revision = await self._kv.update(key, value, last=0)
                elif seen.revision:
                    revision = await self._kv.update(key, value, last=seen.revision)
                else:
                    revision = await self._kv.create(key, value)
            except KeyWrongLastSequenceError:
                continue  # another replica took one meanwhile, or the key was there: read again
            self._remember(key, _Bucket(tokens - 1, now, revision))
            return
        raise RateLimited(1)  # a visitor racing itself on many replicas this hard is flooding

    async def _read(self, key: str) -> _Bucket:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return _Bucket(float(self._burst), time.time(), 0)
        if not entry.value or entry.revision is None:
            return _Bucket(float(self._burst), time.time(), 0)
        raw = json.loads(entry.value)
        return _Bucket(float(raw["tokens"]), float(raw["at"]), entry.revision)

    def _remember(self, key: str, bucket: _Bucket) -> None:
        self._seen[key] = bucket
        if len(self._seen) > MAX_CACHED:
            self._seen.popitem(last=False)


@dataclass(slots=True)
class _Usage:
    windows: dict[int, int]
    revision: int
    read_at: float


class TenantUsage:
    """Bytes each tenant stored within the log's max age, against KEFU_TENANT_MAX_STORED_BYTES."""

    def __init__(self, kv: KeyValue, limit_bytes: int, max_age_s: float) -> None:
        self._kv = kv
        self.limit_bytes = limit_bytes
        self._window_s = max_age_s / WINDOWS
        self._known: dict[str, _Usage] = {}
        self._pending: dict[str, int] = {}
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, nc: NatsClient, limit_bytes: int, max_age_s: float, *, replicas: int = 1) -> TenantUsage:
        kv = await ensure_key_value(nc.jetstream(), KeyValueConfig(
            bucket=USAGE_BUCKET, history=1, ttl=max_age_s * 2, storage=StorageType.FILE, replicas=replicas))
        return cls(kv, limit_bytes, max_age_s)

    def _window(self) -> int:
        return int(time.time() // self._window_s)

    def _total(self, usage: _Usage) -> int:
        oldest = self._window() - WINDOWS
        return sum(size for window, size in usage.windows.items() if window >= oldest)

    async def used(self, tenant: str) -> int:
        """This process's view of the tenant's stored bytes, its own unflushed ones included."""
        usage = self._known.get(tenant)
        if usage is None or time.monotonic() - usage.read_at > REFRESH_S:
            usage = self._known[tenant] = await self._read(tenant)
        return self._total(usage) + self._pending.get(tenant, 0)

    async def check(self, tenant: str, size: int) -> None:
        self._refuse_over(await self.used(tenant) + size)

    def check_known(self, tenant: str, size: int) -> bool:
        """check() from this process's view while it is fresh, without a round trip: True when that
        decided it (QuotaExceeded when over); False when only check() can tell."""
        usage = self._known.get(tenant)
        if usage is None or time.monotonic() - usage.read_at > REFRESH_S:
            return False
        self._refuse_over(self._total(usage) + self._pending.get(tenant, 0) + size)
        return True

    def _refuse_over(self, total: int) -> None:
        if total > self.limit_bytes:
            raise QuotaExceeded(f"this tenant's stored messages reached its quota of {self.limit_bytes} bytes")

    def add(self, tenant: str, size: int) -> None:
        self._pending[tenant] = self._pending.get(tenant, 0) + size

    async def run(self) -> None:
        """Flush the bytes stored here every FLUSH_S; runs until cancelled (then flushes once more)."""
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                await self.flush()
        finally:
            with contextlib.suppress(NatsError, TimeoutError):
                await asyncio.shield(self.flush())

    async def flush(self) -> None:
        async with self._lock:
            pending, self._pending = self._pending, {}
            for tenant, size in pending.items():
                try:
                    await self._add_to_kv(tenant, size)
                except (NatsError, TimeoutError) as error:
                    # Kept for the next round: the quota must not forget what was stored.
                    self._pending[tenant] = self._pending.get(tenant, 0) + size
                    log.warning("tenant usage not written: %s", str(error) or type(error).__name__)

    async def _add_to_kv(self, tenant: str, size: int) -> None:
        usage = self._known.get(tenant) or await self._read(tenant)
        for _ in range(CAS_ATTEMPTS * 4):
            window, oldest = self._window(), self._window() - WINDOWS
            windows = {w: s for w, s in usage.windows.items() if w >= oldest}
            windows[window] = windows.get(window, 0) + size
            value = json.dumps({str(w): s for w, s in windows.items()}).encode()
            try:
                revision = (await self._kv.update(tenant, value, last=usage.revision) if usage.revision
                            else await self._kv.create(tenant, value))
            except KeyWrongLastSequenceError:
                usage = await self._read(tenant)
                continue
            self._known[tenant] = _Usage(windows, revision, time.monotonic())
            return
        raise TimeoutError(f"tenant usage of {tenant}: too many concurrent writers")

    async def _read(self, tenant: str) -> _Usage:
        try:
            entry = await self._kv.get(tenant)
        except KeyNotFoundError:
            return _Usage({}, 0, time.monotonic())
        if not entry.value or entry.revision is None:
            return _Usage({}, 0, time.monotonic())
        return _Usage({int(w): int(s) for w, s in json.loads(entry.value).items()}, entry.revision,
                      time.monotonic())
