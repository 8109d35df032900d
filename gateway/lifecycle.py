"""The edge's start-up and clean-up, in one place: what opens (in order) when the app starts and closes when it stops.

`wire(app)` registers everything; each cleanup context opens one resource and closes it after
`yield`, so the order of `wire` is the order of start-up and its reverse the order of clean-up.
A drain (SIGTERM) sets `EdgeState.draining`: watchers await that event, nothing polls a flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.bus import BusUnavailable, EdgeBus
from gateway.clients import BackendClients
from gateway.directory import Directory
from gateway.directory.account_status import AccountStatus
from gateway.directory.blacklist import Blacklist
from gateway.directory.buckets import Buckets, DirectoryUnavailable, cancel_and_wait
from gateway.directory.tenants import TenantSettingsStore
from gateway.handlers.widget_token import address_limiters
from gateway.live.desk import Desks
from gateway.live.frames import CLOSE_DRAINING
from gateway.live.handoff import HandoffRules
from gateway.live.hub import LiveHub
from gateway.live.service import LiveService
from gateway.login_limits import LoginLimits

log = logging.getLogger(__name__)

BLACKLIST_RETRY_S = 1.0


def wire(app: web.Application) -> None:
    """Register the edge's cleanup contexts and shutdown hooks, in start-up order."""
    app.cleanup_ctx.append(nats_bus)
    app.cleanup_ctx.append(directory)  # KV stores and the watched blacklist; needs the bus, never waits for it
    app.cleanup_ctx.append(backend_clients)
    app.cleanup_ctx.append(login_limits)
    app.cleanup_ctx.append(live_chat)  # shared conversation feeds; needs the clients above
    app.on_shutdown.append(close_sockets)  # 1012: reconnect elsewhere
    app.on_shutdown.append(close_open_streams)
    app.on_shutdown.append(close_readiness)


async def nats_bus(app: web.Application) -> AsyncIterator[None]:
    bus = app[keys.BUS] = EdgeBus(app[keys.SETTINGS].nats_url)
    bus.start()
    yield
    await bus.close()


async def directory(app: web.Application) -> AsyncIterator[None]:
    """The KV stores and the blacklist copy, loaded once NATS is reachable: the edge starts without NATS."""
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
            await asyncio.sleep(BLACKLIST_RETRY_S)


async def backend_clients(app: web.Application) -> AsyncIterator[None]:
    app[keys.CLIENTS] = BackendClients.connect(app[keys.SETTINGS])
    yield
    await app[keys.CLIENTS].close()


async def login_limits(app: web.Application) -> AsyncIterator[None]:
    limits = app[keys.LOGIN_LIMITS] = LoginLimits.of(app[keys.SETTINGS])
    yield
    limits.close()  # its argon2 threads


async def live_chat(app: web.Application) -> AsyncIterator[None]:
    """The hub, the desks and the live service; a draining edge closes its sockets with 1012 so
    clients resume elsewhere."""
    settings = app[keys.SETTINGS]
    hub = app[keys.LIVE_HUB] = LiveHub(app[keys.CLIENTS], settings, app[keys.BUS], app[keys.METRICS])
    desks = Desks(hub, app[keys.CLIENTS], app[keys.BUS], poll_s=settings.desk_poll_s,
                  rpc_timeout_s=settings.rpc_timeout_s)
    live = app[keys.LIVE] = LiveService(
        clients=app[keys.CLIENTS], settings=settings, hub=hub, desks=desks, metrics=app[keys.METRICS],
        state=app[keys.STATE], verifier=app[keys.VERIFIER], handoff_rules=HandoffRules(settings.handoff_keywords),
        tenant_settings=app.get(keys.TENANT_SETTINGS), blacklist=app.get(keys.BLACKLIST),
        accounts=app.get(keys.ACCOUNT_STATUS))
    if live.blacklist is not None:
        live.blacklist.on_change(live.close_blocked)
    draining = app[keys.STATE].draining

    async def close_when_draining() -> None:
        await draining.wait()  # set by the process's signal handler, which knows nothing of sockets
        hub.close_all(CLOSE_DRAINING, "server draining")

    watchers = [asyncio.create_task(close_when_draining()),
                asyncio.create_task(live.watch_disabled_accounts(settings.account_check_s))]
    yield
    for watcher in watchers:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    await desks.aclose()
    await hub.aclose()


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: aiohttp would otherwise wait for every open socket's handler."""
    app[keys.LIVE_HUB].close_all(CLOSE_DRAINING, "server shutting down")


async def close_open_streams(app: web.Application) -> None:
    """on_shutdown: end every SSE stream still open so the server can stop."""
    open_streams = app[keys.OPEN_STREAMS]
    for response in list(open_streams):
        try:
            await response.write_eof()
        except ConnectionError:
            pass


async def close_readiness(app: web.Application) -> None:
    await app[keys.READINESS].aclose()  # a round of health checks still in flight
