"""`python -m gateway`: the HTTP/SSE edge."""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass
from typing import Self

from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import Field

from gateway import keys
from gateway.app import create_app
from gateway.connection_guard import ConnectionGuard, GuardedSite
from gateway.settings import GatewaySettings
from services.common.entrypoint import run_process
from services.common.grpc_server import wait_for_stop_signal
from services.common.metrics import MetricsServer, start_metrics_server
from services.common.settings import KefuSettings

log = logging.getLogger("gateway")


def raise_open_file_limit() -> None:
    """One socket per stream: take the whole hard limit, so a busy edge does not hit EMFILE at 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open file limit raised from %d to %d", soft, hard)


MAX_WORKERS = 64
LISTEN_BACKLOG = 1024
"""Connections the kernel queues before the edge accepts them (aiohttp's default 128; Linux caps it at
net.core.somaxconn): under a connection flood a full queue drops everyone's SYNs, and a dropped SYN costs a
new visitor a 1 s retransmit, so the queue must outlast the moments the guard is busy cutting."""


class EdgeWorkersSettings(KefuSettings):
    """How many edge processes share the port (the dev stack starts them; read here by each)."""

    workers: int = Field(1, ge=1, le=MAX_WORKERS, validation_alias="KEFU_GATEWAY_WORKERS")
    """KEFU_GATEWAY_WORKERS: edge processes on this machine sharing KEFU_HTTP_PORT (make run starts them).
    Above 1 every one binds the port with SO_REUSEPORT and the kernel spreads new connections over
    them. At 1 the bind is exclusive, so a stray second edge on the port fails at start instead of
    silently taking part of the traffic (as a second grpc.aio server on a port does by default)."""


@dataclass(frozen=True, slots=True)
class EdgeProcessSettings:
    """The edge's settings plus how this process shares its port with the other edge processes."""

    edge: GatewaySettings
    workers: int = 1
    """EdgeWorkersSettings.workers."""

    @property
    def log_level(self) -> str:
        return self.edge.log_level

    @property
    def reuse_port(self) -> bool:
        return self.workers > 1

    @classmethod
    def load(cls) -> Self:
        return cls(GatewaySettings.load(), EdgeWorkersSettings.load().workers)


async def serve(process: EdgeProcessSettings) -> None:
    settings = process.edge
    raise_open_file_limit()
    app = create_app(settings)
    guard = ConnectionGuard.of(settings, app[keys.METRICS].registry) if settings.conn_guard else None
    if guard is not None:
        app[keys.CONNECTION_GUARD] = guard
    metrics_server = start_edge_metrics(app[keys.METRICS].registry, settings)
    # handler_cancellation: a client that hangs up cancels its handler at once, and with
    # it the gRPC streams and the upstream request (by default aiohttp only notices on the next write).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=settings.shutdown_grace_s)
    try:
        await runner.setup()
        # The guard closes abusive connections at accept, before aiohttp parses a byte (issue 17).
        site = (web.TCPSite(runner, settings.host, settings.http_port, reuse_port=process.reuse_port,
                            backlog=LISTEN_BACKLOG)
                if guard is None else
                GuardedSite(runner, settings.host, settings.http_port, guard, reuse_port=process.reuse_port,
                            backlog=LISTEN_BACKLOG))
        await site.start()
        log.info("edge on http://%s:%d (pid %d, %s)", settings.host, settings.http_port, os.getpid(),
                 f"port shared by {process.workers} workers" if process.reuse_port else "exclusive port")
        await wait_for_stop_signal()
        await drain(runner.app, settings.shutdown_grace_s)
    finally:
        await runner.cleanup()
        metrics_server.close()


def start_edge_metrics(registry: CollectorRegistry, settings: GatewaySettings) -> MetricsServer:
    """/metrics on a port apart from the public one (issue 17: the public port served it to anyone).

    Each edge process has its own registry, so each needs its own port (a shared one would answer
    from whichever worker the kernel picked): a process takes the first free port from
    KEFU_EDGE_METRICS_PORT upwards, so KEFU_GATEWAY_WORKERS=3 gives 9110, 9111 and 9112. In
    Kubernetes every pod is one edge process, on the port itself.
    """
    last = settings.metrics_port + (MAX_WORKERS - 1 if settings.metrics_port else 0)
    for port in range(settings.metrics_port, min(last, 65535) + 1):
        try:
            return start_metrics_server(registry, port, settings.host)
        except OSError:
            continue
    # One line on stderr and exit 1, like a bad setting (no traceback).
    raise SystemExit(f"gateway: KEFU_EDGE_METRICS_PORT: no free port in {settings.metrics_port}..{last} for "
                     "this edge's /metrics")


async def drain(app: web.Application, grace_s: float) -> None:
    """Refuse new work at once (readyz 503), let open streams finish for up to `grace_s`."""
    state = app[keys.STATE]
    state.start_draining()
    if not await state.streams_finished(grace_s):
        log.warning("closing %d streams still open after %.0f s", state.open_streams, grace_s)


if __name__ == "__main__":
    run_process("gateway", EdgeProcessSettings.load, serve)
