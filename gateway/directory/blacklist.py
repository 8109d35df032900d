"""The visitor blacklist: entries per tenant in the `kefu_blacklist` bucket, and a watched in-memory copy.

An entry names one visitor id or one address (an IP or a CIDR network). The edge refuses a
blocked visitor a widget token and every /v1/ route (the auth middleware asks `Blacklist.blocks()`
on each visitor request); the WebSocket code asks on connect and re-checks its open sockets when
`on_change` reports a tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from gateway.addresses import Address, parse_address, parse_network
from gateway.directory.buckets import (
    BLACKLIST,
    DEL_OPERATIONS,
    Buckets,
    LimitReached,
    bucket_config,
    cancel_and_wait,
    decode,
    delete_if_present,
    encode,
    nats_errors,
    stored_time,
)
from services.common.nats_client import ensure_key_value

log = logging.getLogger(__name__)

MAX_PER_TENANT = 1000
MAX_REASON_CHARS = 200
MAX_VISITOR_ID_CHARS = 256
MAX_ADDRESS_CHARS = 64

@dataclass(frozen=True, slots=True)
class BlacklistEntry:
    id: str
    tenant: str
    visitor_id: str
    """"" for an address entry."""
    address: str
    """A network in CIDR notation ("203.0.113.7/32"), "" for a visitor entry."""
    reason: str
    created_at: float
    created_by: str

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        for name in ("visitor_id", "address"):
            if not data[name]:
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> BlacklistEntry | None:
        entry_id, tenant, reason = data.get("id"), data.get("tenant"), data.get("reason", "")
        visitor_id, address = data.get("visitor_id", ""), data.get("address", "")
        created_by = data.get("created_by", "")
        created_at = stored_time(data.get("created_at", 0))
        if not (isinstance(entry_id, str) and isinstance(tenant, str) and isinstance(reason, str)
                and isinstance(visitor_id, str) and isinstance(address, str) and isinstance(created_by, str)
                and created_at is not None):
            return None
        entry = cls(id=entry_id, tenant=tenant, visitor_id=visitor_id, address=address, reason=reason,
                    created_at=created_at, created_by=created_by)
        try:
            if entry.address:
                parse_network(entry.address)
        except ValueError:
            return None
        if bool(entry.visitor_id) == bool(entry.address):
            return None
        return entry


class BlacklistStore:
    """Reads and writes of the bucket itself (the HTTP API); `Blacklist` is the watched copy."""

    def __init__(self, buckets: Buckets) -> None:
        self._buckets = buckets

    async def list(self, tenant: str) -> list[BlacklistEntry]:
        entries = []
        for item in await self._buckets.scan(BLACKLIST, f"{tenant}.*"):
            data = decode(item.value, f"{BLACKLIST}/{item.key}")
            entry = BlacklistEntry.from_json(data) if data is not None else None
            if entry is not None and entry.tenant == tenant:
                entries.append(entry)
        return sorted(entries, key=lambda e: (e.created_at, e.id))

    async def add(self, tenant: str, *, visitor_id: str = "", address: str = "", reason: str = "",
                  created_by: str = "") -> BlacklistEntry:
        """Exactly one of `visitor_id` and `address` (checked by the caller; ValueError otherwise)."""
        if bool(visitor_id) == bool(address):
            raise ValueError("give exactly one of visitor_id and address")
        network = str(parse_network(address)) if address else ""
        if len(await self.list(tenant)) >= MAX_PER_TENANT:
            raise LimitReached("blacklist entries", MAX_PER_TENANT)
        entry = BlacklistEntry(secrets.token_hex(8), tenant, visitor_id, network, reason, round(time.time(), 3),
                               created_by)
        kv = await self._buckets.open(BLACKLIST)
        async with nats_errors():
            await kv.create(f"{tenant}.{entry.id}", encode(entry.to_json()))
        return entry

    async def delete(self, tenant: str, entry_id: str) -> bool:
        return await delete_if_present(await self._buckets.open(BLACKLIST), f"{tenant}.{entry_id}")


@dataclass(frozen=True, slots=True)
class TenantIndex:
    """One tenant's entries as `Blacklist.blocks()` reads them: set lookups only."""

    visitors: frozenset[str]
    networks: frozenset[tuple[int, int, int]]
    """Each listed network as (IP version, prefix length, its address without the host bits)."""
    prefixes: tuple[tuple[int, int], ...]
    """The (IP version, prefix length) pairs in `networks`: a lookup probes the set once for each.

    Every HTTP request of a visitor asks (issue 17), so a tenant's 1000 networks must not mean 1000
    `in` tests a request; at most 33 IPv4 and 129 IPv6 prefix lengths exist.
    """

    @classmethod
    def of(cls, entries: Iterable[BlacklistEntry]) -> TenantIndex:
        visitors: set[str] = set()
        networks: set[tuple[int, int, int]] = set()
        for entry in entries:
            if entry.visitor_id:
                visitors.add(entry.visitor_id)
            if entry.address:
                network = parse_network(entry.address)
                networks.add(_network_key(network.version, network.prefixlen, network.network_address))
        return cls(frozenset(visitors), frozenset(networks), tuple(sorted({k[:2] for k in networks})))

    def holds(self, ip: Address) -> bool:
        """Whether one of the listed networks holds this address."""
        return any(_network_key(version, prefix, ip) in self.networks
                   for version, prefix in self.prefixes if version == ip.version)


def _network_key(version: int, prefix: int, address: Address) -> tuple[int, int, int]:
    return version, prefix, int(address) >> (address.max_prefixlen - prefix)


class Blacklist:
    """Every tenant's entries in memory, kept current by a KV watch; `blocks()` answers without I/O.

    Until the first copy is loaded (`ready`), nothing is blocked: the edge serves without NATS, and
    what needs NATS (live chat) is down then anyway. The watch is started again from a fresh
    snapshot every `resync_s`, so a watch that went quiet (a consumer lost in a NATS restart)
    costs at most that long.
    """

    def __init__(self, *, replicas: int = 1, resync_s: float = 60.0, retry_s: float = 1.0,
                 timeout_s: float = 5.0) -> None:
        self._replicas = replicas
        self._resync_s = resync_s
        self._retry_s = retry_s
        self._timeout_s = timeout_s
        self._entries: dict[str, dict[str, BlacklistEntry]] = {}
        """By tenant, then by KV key."""
        self._index: dict[str, TenantIndex] = {}
        self._callbacks: list[Callable[[str], None]] = []
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """True once the first copy of the bucket is in memory."""
        return self._loaded.is_set()

    async def start(self, nc: NatsClient, *, wait_s: float = 5.0) -> None:
        """Open (or create) the bucket and start the watch; wait up to `wait_s` for the first copy.

        Raises DirectoryUnavailable when the bucket cannot be opened. Returns after `wait_s`
        even when the first copy is not in yet (then `ready` is False and the watch keeps trying).
        """
        if self._task is not None:
            raise RuntimeError("Blacklist.start() called twice")
        async with nats_errors():
            kv = await ensure_key_value(nc.jetstream(timeout=self._timeout_s),
                                        bucket_config(BLACKLIST, self._replicas))
        self._task = asyncio.create_task(self._watch(kv), name="blacklist-watch")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._loaded.wait()

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    def on_change(self, callback: Callable[[str], None]) -> None:
        """`callback(tenant)` after that tenant's entries changed (called on the event loop, must not block)."""
        self._callbacks.append(callback)

    def blocks(self, tenant: str, visitor_id: str | None, address: str | None) -> bool:
        """Whether the tenant blacklists this visitor id or an address in one of its listed networks."""
        index = self._index.get(tenant)
        if index is None:
            return False
        if visitor_id and visitor_id in index.visitors:
            return True
        if index.networks:
            ip = parse_address(address)
            if ip is not None:
                return index.holds(ip)
        return False

    def entries(self, tenant: str) -> list[BlacklistEntry]:
        """The tenant's entries as this copy holds them."""
        return sorted(self._entries.get(tenant, {}).values(), key=lambda e: (e.created_at, e.id))

    async def _watch(self, kv: KeyValue) -> None:
        while True:
            watcher: KeyValue.KeyWatcher | None = None
            try:
                watcher = await kv.watch("*.*")
                snapshot: dict[str, BlacklistEntry] = {}
                # asyncio.timeout, not watcher.updates(): its wait_for can swallow a cancel on 3.11.
                async with asyncio.timeout(self._timeout_s):
                    async for item in watcher:
                        if item is None:  # the end of the current values
                            break
                        entry = _entry_of(item)
                        if entry is not None:
                            snapshot[item.key] = entry
                self._replace(snapshot)
                self._loaded.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._resync_s):
                        async for item in watcher:
                            if isinstance(item, KeyValue.Entry):
                                self._apply(item)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a watch that failed is started again, whatever broke it
                log.warning("blacklist watch failed (%s); retrying", error or type(error).__name__)
                await asyncio.sleep(self._retry_s)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()

    def _replace(self, snapshot: dict[str, BlacklistEntry]) -> None:
        fresh: dict[str, dict[str, BlacklistEntry]] = {}
        for key, entry in snapshot.items():
            fresh.setdefault(entry.tenant, {})[key] = entry
        changed = {tenant for tenant in fresh.keys() | self._entries.keys()
                   if fresh.get(tenant) != self._entries.get(tenant)}
        self._entries = fresh
        for tenant in changed:
            self._reindex(tenant)
        self._notify(changed)

    def _apply(self, item: KeyValue.Entry) -> None:
        tenant = item.key.partition(".")[0]
        mine = self._entries.setdefault(tenant, {})
        old = mine.pop(item.key, None)
        entry = _entry_of(item)
        if entry is not None:
            mine[item.key] = entry
        if not mine:
            del self._entries[tenant]
        if old != entry:
            self._reindex(tenant)
            self._notify({tenant})

    def _reindex(self, tenant: str) -> None:
        mine = self._entries.get(tenant)
        if not mine:
            self._index.pop(tenant, None)
            return
        self._index[tenant] = TenantIndex.of(mine.values())

    def _notify(self, tenants: set[str]) -> None:
        for tenant in sorted(tenants):
            for callback in self._callbacks:
                try:
                    callback(tenant)
                except Exception:
                    log.exception("blacklist on_change callback failed for tenant %s", tenant)


def _entry_of(item: KeyValue.Entry) -> BlacklistEntry | None:
    if item.operation in DEL_OPERATIONS:
        return None
    data = decode(item.value, f"{BLACKLIST}/{item.key}")
    entry = BlacklistEntry.from_json(data) if data is not None else None
    # The key names the tenant; a value claiming another is not trusted.
    if entry is not None and item.key.partition(".")[0] != entry.tenant:
        return None
    return entry
