"""The answer cache: an in-process LRU bounded by bytes with TTL, and a shared tier in JetStream KV.

Invalidation works by epochs: every key embeds the current epoch of "all", of its tenant and
of its route; bumping one (admin RPC or NATS subject) makes every older entry unreachable at
once on every replica, and the entries then age out by their TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.common.nats_client import ensure_key_value
from services.llm_worker.cache_key import CacheKey
from services.llm_worker.citations import Citation

log = logging.getLogger(__name__)

CACHE_BUCKET = "kefu_cache"
EPOCH_BUCKET = "kefu_cache_epochs"
INVALIDATE_SUBJECT = "kefu.cache.invalidate"


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    text: str
    finish_reason: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    pregenerated: bool = False
    citations: tuple[Citation, ...] = ()
    """The tenant's passages the answer cites (served with it again)."""

    @property
    def size(self) -> int:
        cited = sum(len(c.quote.encode()) + len(c.title.encode()) + len(c.url) + 96 for c in self.citations)
        return len(self.text.encode()) + len(self.model) + 96 + cited

    def to_json(self) -> bytes:
        raw = asdict(self)
        raw["citations"] = [c.to_json() for c in self.citations]
        return json.dumps(raw, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CachedAnswer:
        raw = json.loads(data)
        raw["citations"] = tuple(Citation.from_json(c) for c in raw.get("citations", ()))
        return cls(**raw)


@dataclass(slots=True)
class _Entry:
    answer: CachedAnswer
    expires: float
    served: bool = False


class LocalTier:
    """LRU bounded by bytes, entries expire after `ttl_s`; `on_drop(answer, served)` sees every eviction."""

    def __init__(self, max_bytes: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[CachedAnswer, bool], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self._ttl = ttl_s
        self._clock = clock
        self._on_drop = on_drop
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        entry.served = True
        return entry.answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        if answer.size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(answer, self._clock() + self._ttl)
        self.bytes += answer.size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def __contains__(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.expires > self._clock()

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.answer.size
        if self._on_drop is not None:
            self._on_drop(entry.answer, entry.served)


class Epochs:
    """Invalidation counters in a KV bucket, mirrored locally by a watcher."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._values: dict[str, int] = {}
        self._watcher: asyncio.Task[None] | None = None

    @staticmethod
    def _name(scope: str, value: str = "") -> str:
        # Route names may hold characters a KV key may not; hash them.
        return scope if not value else f"{scope}.{hashlib.sha256(value.encode()).hexdigest()[:24]}"

    def token(self, tenant: str, route: str) -> str:
        values = self._values
        return (f"{values.get('all', 0)}.{values.get(self._name('t', tenant), 0)}."
                f"{values.get(self._name('r', route), 0)}")

    async def start(self) -> None:
        watcher = await self._kv.watchall()
        ready = asyncio.Event()

        async def follow() -> None:
            async for entry in watcher:
                if entry is None:  # the initial values have all arrived
                    ready.set()
                    continue
                if entry.value:
                    self._values[entry.key] = int(entry.value)
            ready.set()

        self._watcher = asyncio.create_task(follow(), name="cache-epochs")
        await asyncio.wait_for(ready.wait(), 10)

    async def bump(self, tenant: str = "", route: str = "") -> None:
        name = self._name("t", tenant) if tenant else self._name("r", route) if route else "all"
        for _ in range(20):
            try:
                entry = await self._kv.get(name)
                current, revision = int(entry.value or b"0"), entry.revision
            except KeyNotFoundError:
                current, revision = 0, None
            try:
                if revision is None:
                    await self._kv.create(name, str(current + 1).encode())
                else:
                    await self._kv.update(name, str(current + 1).encode(), last=revision)
                self._values[name] = current + 1  # visible here at once; the watcher confirms
                return
            except KeyWrongLastSequenceError:
                continue

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


class AnswerCache:
    """Local tier first, then the shared tier (which refills the local one)."""

    def __init__(self, local: LocalTier, shared: KeyValue | None = None, epochs: Epochs | None = None) -> None:
        self.local = local
        self._shared = shared
        self.epochs = epochs

    @classmethod
    async def with_nats(cls, local: LocalTier, nc: NatsClient, ttl_s: float, replicas: int = 1) -> AnswerCache:
        js = nc.jetstream()
        # Direct gets: a lookup per turn is served by the stream itself (any replica; a second-stale answer is
        # still a right one), not by the JetStream API's JSON and base64 round trip.
        shared = await ensure_key_value(js, KeyValueConfig(bucket=CACHE_BUCKET, history=1, ttl=ttl_s,
                                                           storage=StorageType.FILE, replicas=replicas, direct=True),
                                        reconcile=True)
        epoch_kv = await ensure_key_value(js, KeyValueConfig(bucket=EPOCH_BUCKET, history=1,
                                                             storage=StorageType.FILE, replicas=replicas))
        epochs = Epochs(epoch_kv)
        await epochs.start()
        return cls(local, shared, epochs)

    def epoch_token(self, tenant: str, route: str) -> str:
        return self.epochs.token(tenant, route) if self.epochs is not None else "0"

    async def lookup(self, key: CacheKey) -> tuple[CachedAnswer, str] | None:
        """The answer and the tier that had it ("local" or "shared"), or None on a miss in both."""
        answer = self.local.get(key.kv_key)
        if answer is not None:
            return answer, "local"
        if self._shared is None:
            return None
        try:
            entry = await self._shared.get(key.kv_key)
        except KeyNotFoundError:
            return None
        except Exception as error:  # the shared tier is an optimisation: a NATS hiccup is a miss
            log.warning("shared cache unavailable: %s", error)
            return None
        if not entry.value:
            return None
        answer = CachedAnswer.from_json(entry.value)
        self.local.put(key.kv_key, replace(answer, pregenerated=False))
        return answer, "shared"

    def contains_locally(self, key: CacheKey) -> bool:
        return key.kv_key in self.local

    async def contains(self, key: CacheKey) -> bool:
        """Held by either tier (without counting as served)."""
        if key.kv_key in self.local:
            return True
        if self._shared is None:
            return False
        try:
            entry = await self._shared.get(key.kv_key)
        except KeyNotFoundError:
            return False
        except Exception as error:
            log.warning("shared cache unavailable: %s", error)
            return False
        return bool(entry.value)

    async def store(self, key: CacheKey, answer: CachedAnswer) -> None:
        self.local.put(key.kv_key, answer)
        if self._shared is None:
            return
        try:
            await self._shared.put(key.kv_key, answer.to_json())
        except Exception as error:
            log.warning("shared cache write failed: %s", error)

    async def invalidate(self, tenant: str = "", route: str = "") -> None:
        if self.epochs is not None:
            await self.epochs.bump(tenant, route)
        else:
            self.local.clear()  # no shared epochs: forget everything this process holds

    async def aclose(self) -> None:
        if self.epochs is not None:
            await self.epochs.aclose()
