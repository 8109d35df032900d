"""`python -m gateway`: the HTTP/SSE edge."""

from __future__ import annotations

import asyncio
import logging
import resource
import time

from aiohttp import web

from gateway import keys
from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.common.entrypoint import run_process
from services.common.grpc_server import wait_for_stop_signal

log = logging.getLogger("gateway")


def raise_open_file_limit() -> None:
    """One socket per stream: take the whole hard limit, so a busy edge does not hit EMFILE at 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open file limit raised from %d to %d", soft, hard)


async def serve(settings: GatewaySettings) -> None:
    raise_open_file_limit()
    # handler_cancellation: a client that hangs up cancels its handler at once, and with
    # it the gRPC streams and the upstream request (NOTES §6).
    runner = web.AppRunner(create_app(settings), handler_cancellation=True, access_log=None,
                           shutdown_timeout=settings.shutdown_grace_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.http_port)
    await site.start()
    log.info("edge on http://%s:%d", settings.host, settings.http_port)
    try:
        await wait_for_stop_signal()
        await drain(runner.app, settings.shutdown_grace_s)
    finally:
        await runner.cleanup()


async def drain(app: web.Application, grace_s: float) -> None:
    """Refuse new work at once (readyz 503), let open streams finish for up to `grace_s`."""
    state = app[keys.STATE]
    state.draining = True
    deadline = time.monotonic() + grace_s
    while state.open_streams and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.open_streams:
        log.warning("closing %d streams still open after %.0f s", state.open_streams, grace_s)


if __name__ == "__main__":
    run_process("gateway", GatewaySettings.from_env, serve)
