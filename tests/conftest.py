"""Fixtures shared by every test: a real nats-server on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer, start_nats_server
from tests import loop_shutdown

loop_shutdown.install()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = start_nats_server(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    # Bounded retries: nats-py otherwise retries a refused connect for about two minutes.
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=3, reconnect_time_wait=0.2, connect_timeout=1)
    try:
        yield nc
    finally:
        await nc.close()
