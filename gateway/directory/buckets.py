"""Opening the edge's KV buckets once, and the helpers every store shares (scan, JSON, errors)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.bus import BusUnavailable
from gateway.errors import ApiError
from services.common.kv_values import KvValue, live_values
from services.common.nats_client import ensure_key_value

log = logging.getLogger(__name__)

CANNED = "kefu_canned"
BLACKLIST = "kefu_blacklist"
TENANTS = "kefu_tenants"
"""Key `<tenant>`; the session service reads `leave_message` from the same value."""
AGENTS = "kefu_agents"

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""As gateway.auth: a tenant name is one KV key token (no dots, no wildcards)."""
ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
"""Ids the stores hand out (`secrets.token_hex(8)`)."""
DEL_OPERATIONS = frozenset({"DEL", "PURGE"})


class DirectoryUnavailable(ApiError):
    """NATS (or its JetStream) is not reachable: 503 `unavailable` at the edge, exit 1 in the CLI."""

    status = 503

    def __init__(self, detail: str) -> None:
        super().__init__("unavailable", f"the edge's store is not reachable: {detail}",
                         headers={"Retry-After": "1"})


class LimitReached(ApiError):
    """A tenant holds as many records of a kind as it may."""

    status = 409

    def __init__(self, what: str, limit: int) -> None:
        super().__init__("limit_reached", f"a tenant may keep at most {limit} {what}")
        self.limit = limit


def bucket_config(bucket: str, replicas: int = 1) -> KeyValueConfig:
    return KeyValueConfig(bucket=bucket, history=1, replicas=replicas, storage=StorageType.FILE)


class Buckets:
    """The KV buckets, each opened (and created on first use) once and then reused."""

    def __init__(self, connection: Callable[[], Awaitable[NatsClient]], *, replicas: int = 1,
                 timeout_s: float = 5.0) -> None:
        self._connection = connection
        self._replicas = replicas
        self.timeout_s = timeout_s
        self._open: dict[str, KeyValue] = {}
        self._lock = asyncio.Lock()

    async def open(self, bucket: str) -> KeyValue:
        found = self._open.get(bucket)
        if found is not None:
            return found
        async with self._lock, nats_errors():
            if bucket not in self._open:
                nc = await self._connection()
                js = nc.jetstream(timeout=self.timeout_s)
                self._open[bucket] = await ensure_key_value(js, bucket_config(bucket, self._replicas))
            return self._open[bucket]

    async def scan(self, bucket: str, pattern: str) -> list[KvValue]:
        """The live values under `pattern` (e.g. "shop1.*"), deleted keys left out (see live_values)."""
        await self.open(bucket)  # created on first use
        async with nats_errors():
            nc = await self._connection()
            return await live_values(nc.jetstream(timeout=self.timeout_s), bucket, pattern, timeout_s=self.timeout_s)


@contextlib.asynccontextmanager
async def nats_errors() -> AsyncIterator[None]:
    """Any failure to reach NATS becomes DirectoryUnavailable; a missing key and a lost CAS race pass through."""
    try:
        yield
    except (KeyNotFoundError, KeyWrongLastSequenceError):
        raise
    except (BusUnavailable, nats.errors.Error, TimeoutError, ConnectionError) as error:
        raise DirectoryUnavailable(str(error) or type(error).__name__) from None


async def delete_if_present(kv: KeyValue, key: str) -> bool:
    """Delete `key`; False when there was no such key (a 404 for the caller, not an error)."""
    async with nats_errors():
        try:
            await kv.get(key)
        except KeyNotFoundError:
            return False
        await kv.delete(key)
    return True


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait for its end, cancelling again while it runs on.

    nats-py awaits its requests with asyncio.wait_for, which on Python 3.11 can swallow a
    cancel that arrives with the reply (https://github.com/python/cpython/issues/86296): one
    cancel() may be lost.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s ended with %r", task.get_name(), task.exception())


def encode(data: Mapping[str, object]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def decode(raw: bytes | None, where: str) -> dict[str, object] | None:
    """A stored JSON object, or None (logged) for anything else: one bad record must not break a list."""
    try:
        data = json.loads(raw or b"")
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        log.warning("ignoring a malformed record at %s", where)
        return None
    return data


def stored_time(value: object) -> float | None:
    """A stored timestamp as float() reads it (a number or its text); None for anything else."""
    if not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None
