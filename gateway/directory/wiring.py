"""cleanup_ctx of the edge: the KV stores, and the blacklist copy loaded once NATS is reachable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.bus import BusUnavailable, EdgeBus
from gateway.directory import Directory
from gateway.directory.account_status import AccountStatus
from gateway.directory.blacklist import Blacklist
from gateway.directory.buckets import Buckets, DirectoryUnavailable, cancel_and_wait
from gateway.directory.tenants import TenantSettingsStore
from gateway.handlers.widget_token import address_limiters

log = logging.getLogger(__name__)

RETRY_S = 1.0


async def directory(app: web.Application) -> AsyncIterator[None]:
    """Needs app[keys.BUS]; never waits for NATS itself, so the edge starts without it."""
    settings = app[keys.SETTINGS]
    bus = app[keys.BUS]
    buckets = Buckets(lambda: bus.connection(settings.rpc_timeout_s), replicas=settings.nats_replicas,
                      timeout_s=settings.rpc_timeout_s)
    app[keys.DIRECTORY] = Directory.over(buckets)
    app[keys.ACCOUNT_STATUS] = AccountStatus(app[keys.DIRECTORY].agents, lambda: bus.is_connected,
                                             ttl_s=settings.account_check_s)
    app[keys.TENANT_SETTINGS] = TenantSettingsStore(buckets)
    app[keys.ADDRESS_LIMITS] = address_limiters(settings)
    blacklist = app[keys.BLACKLIST] = Blacklist(replicas=settings.nats_replicas, timeout_s=settings.rpc_timeout_s)
    starter = asyncio.create_task(_start_blacklist(bus, blacklist), name="blacklist-start")
    yield
    await cancel_and_wait(starter)
    await blacklist.aclose()


async def _start_blacklist(bus: EdgeBus, blacklist: Blacklist) -> None:
    while True:
        try:
            nc = await bus.connection(3600)
            await blacklist.start(nc)
            return
        except (BusUnavailable, DirectoryUnavailable) as error:
            log.warning("blacklist not loaded yet (%s); retrying", error)
            await asyncio.sleep(RETRY_S)
