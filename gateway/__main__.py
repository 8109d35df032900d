"""`python -m gateway`: the HTTP/SSE edge."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.common.entrypoint import run_process
from services.common.grpc_server import wait_for_stop_signal

log = logging.getLogger("gateway")


async def serve(settings: GatewaySettings) -> None:
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
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    run_process("gateway", GatewaySettings.from_env, serve)
