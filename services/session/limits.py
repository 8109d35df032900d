"""What one visitor or one tenant may store: a message rate per visitor and stored bytes per tenant (issue 17).

Both live in NATS KV, so they hold across every edge and every session replica:
- `kefu_visitor_rates`, key `<tenant>.<sha256(visitor)[:32]>`: a token bucket. A message takes its token from
  this process's view of the bucket, without a round trip (issue 20: a message's only JetStream write is
  itself); what it took is written behind, at most once per FLUSH_S per key, by CAS against the revision
  this view last wrote or read, merging with what other replicas wrote when that lost (read, refill to now,
  subtract, write again). That write is the view's refresh: no take waits for a read (a view this process
  never had is assumed a new visitor's full bucket), so a replica may admit from a view that misses what
  others took since its last write, until its next write (within FLUSH_S) merges them. Others only take
  tokens, so a refusal from any view stands; an admission may overshoot: a visitor spread over N replicas
  gets at most about N x (burst + rate x FLUSH_S) at once, and the merged bucket then carries the excess
  as debt (down to -burst), so over time it gets the rate. One replica alone admits exactly the bucket.
  Cost: per visitor and second with messages, one KV write (plus a read when another replica wrote the key
  since). A key idle long enough to be full again ages out: a missing key is a full bucket.
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
from collections.abc import Awaitable, Callable
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
"""Memory for the buckets of about 400,000 visitors active within a TTL; beyond it nats-server refuses new
keys rather than its memory growing without end: messages still flow, each replica limiting from its own
view, and the refused writes are tried again every flush until keys age out."""
MAX_CACHED = 65536
WINDOWS = 8
"""Windows per max age of the log: finer windows free aged-out bytes sooner."""
FLUSH_S = 1.0
REFRESH_S = 2.0
FLUSH_CONCURRENCY = 32
"""Visitor keys written at once by a flush: many visitors' writes in a few round trips."""


@dataclass(frozen=True, slots=True)
class _Bucket:
    tokens: float
    at: float
    revision: int
    """KV revision of the key as this process last saw it; 0: no key (a full bucket); ASSUMED: not read."""


ASSUMED = -1
"""A visitor this process does not know: most likely a new one, whose missing key is a full bucket. Its
first write expects no key (no read first) and reads and merges only if a key was there."""


class VisitorRates:
    """A token bucket per visitor (tenant and JWT `sub`) shared by every session replica, taken from this
    process's view and written behind (run(), flush())."""

    def __init__(self, kv: KeyValue, rate: float, burst: int) -> None:
        self._kv = kv
        self._rate = rate
        self._burst = burst
        self._views: OrderedDict[str, _Bucket] = OrderedDict()
        self._unwritten: dict[str, int] = {}
        """Tokens taken here since the key's last write; kept apart from the views, so that evicting a view
        never loses them (the flush then reads the key to merge)."""
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, nc: NatsClient, rate: float, burst: int, *, replicas: int = 1) -> VisitorRates:
        # A bucket refills in burst/rate seconds (2 x that from the lowest debt); a key idle for longer says
        # nothing a missing one does not.
        ttl = max(60.0, math.ceil(burst / rate) * 2)
        kv = await ensure_key_value(nc.jetstream(), KeyValueConfig(
            bucket=RATES_BUCKET, history=1, ttl=ttl, storage=StorageType.MEMORY, replicas=replicas,
            max_bytes=RATES_MAX_BYTES))
        return cls(kv, rate, burst)

    @staticmethod
    def key(tenant: str, visitor: str) -> str:
        return f"{tenant}.{hashlib.sha256(visitor.encode()).hexdigest()[:32]}"

    async def take(self, tenant: str, visitor: str) -> None:
        """One message's token from this process's view, without a round trip; RateLimited (with the
        seconds until the next one) when the view has none."""
        key = self.key(tenant, visitor)
        now = time.time()
        view = self._views.get(key)
        if view is None:  # most likely a new visitor, whose missing key is a full bucket
            view = _Bucket(float(self._burst - self._unwritten.get(key, 0)), now, ASSUMED)
        tokens = self._refill(view, now)
        if tokens < 1:
            # Others only ever take tokens: a stale view has more than the truth, so this refusal stands.
            self._remember(key, _Bucket(tokens, now, view.revision))
            raise RateLimited(max(1, math.ceil((1 - tokens) / self._rate)))
        self._remember(key, _Bucket(tokens - 1, now, view.revision))
        self._unwritten[key] = self._unwritten.get(key, 0) + 1

    def _refill(self, bucket: _Bucket, now: float) -> float:
        return min(float(self._burst), bucket.tokens + max(0.0, now - bucket.at) * self._rate)

    def _remember(self, key: str, bucket: _Bucket) -> None:
        self._views[key] = bucket
        self._views.move_to_end(key)
        if len(self._views) > MAX_CACHED:
            self._views.popitem(last=False)  # its unwritten tokens stay in _unwritten until written

    async def run(self) -> None:
        """Write the tokens taken here every FLUSH_S; runs until cancelled (then writes once more)."""
        await flush_every(self.flush)

    async def flush(self) -> None:
        """Merge the tokens taken here into each visitor's key, one write per key. Tokens not written (a
        failed write, a full bucket store, a cancelled flush) are kept for the next one; the view here still
        limits meanwhile."""
        async with self._lock:
            pending, self._unwritten = self._unwritten, {}
            keys = list(pending)
            failed = 0
            try:
                for start in range(0, len(keys), FLUSH_CONCURRENCY):
                    batch = keys[start:start + FLUSH_CONCURRENCY]
                    results = await asyncio.gather(*(self._write(key, pending[key]) for key in batch),
                                                   return_exceptions=True)
                    for key, result in zip(batch, results, strict=True):
                        if result is None:
                            del pending[key]
                        elif isinstance(result, (NatsError, TimeoutError)):
                            failed += 1
                        elif isinstance(result, Exception):
                            del pending[key]  # a value this code cannot read: retrying would not help
                            log.error("visitor rate not written: %r", result)
                        else:
                            raise result
            finally:
                for key, taken in pending.items():
                    # Unless this process already holds as many as it caches (a store down for long):
                    # then forgotten rather than growing without bound.
                    if key in self._unwritten or len(self._unwritten) < MAX_CACHED:
                        self._unwritten[key] = self._unwritten.get(key, 0) + taken
            if failed:
                log.warning("visitor rates: %d of %d keys not written, retried next flush", failed, len(keys))

    async def _write(self, key: str, taken: int) -> None:
        view = self._views.get(key)
        base: _Bucket | None = None
        if view is not None and view.revision != ASSUMED:
            # The key as this view last saw it, with this round's tokens given back: when nobody wrote it
            # since (the CAS tells), that plus the refill is the truth, and no read is needed.
            base = _Bucket(view.tokens + taken + self._unwritten.get(key, 0), view.at, view.revision)
        elif view is not None:
            assumed = view.tokens + taken + self._unwritten.get(key, 0)
            base = _Bucket(assumed, view.at, ASSUMED)  # written only if the key never had a message
        for _ in range(CAS_ATTEMPTS):
            if base is None:
                base = await self._read(key)
            now = time.time()
            tokens = max(-float(self._burst), self._refill(base, now) - taken)
            value = json.dumps({"tokens": tokens, "at": now}).encode()
            try:
                if base.revision == ASSUMED:
                    # Expects no message at all under the key (create() would also read to tell a live key
                    # from a deleted one): a key there, live or not, is read and merged on the next try.
                    revision = await self._kv.update(key, value, last=0)
                elif base.revision:
                    revision = await self._kv.update(key, value, last=base.revision)
                else:
                    revision = await self._kv.create(key, value)
            except KeyWrongLastSequenceError:
                base = None  # another replica wrote it since: read and merge again
                continue
            # The view is the key as written, less what was taken here while it was written.
            self._remember(key, _Bucket(tokens - self._unwritten.get(key, 0), now, revision))
            return
        raise TimeoutError(f"visitor rate {key}: too many concurrent writers")

    async def _read(self, key: str) -> _Bucket:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return _Bucket(float(self._burst), time.time(), 0)
        if not entry.value or entry.revision is None:
            return _Bucket(float(self._burst), time.time(), 0)
        raw = json.loads(entry.value)
        return _Bucket(float(raw["tokens"]), float(raw["at"]), entry.revision)


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
        await flush_every(self.flush)

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


async def flush_every(flush: Callable[[], Awaitable[None]]) -> None:
    """Call `flush` every FLUSH_S until cancelled, then once more: what was taken or stored here is not lost."""
    try:
        while True:
            await asyncio.sleep(FLUSH_S)
            await flush()
    finally:
        with contextlib.suppress(NatsError, TimeoutError):
            await asyncio.shield(flush())
