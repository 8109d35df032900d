"""Fixtures shared by every test: a real nats-server on a free port; no task left behind an async test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer, start_nats_server


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


LEFTOVER_TASKS_TIMEOUT_S = 10.0


@pytest.fixture(autouse=True)
async def no_task_left_behind() -> AsyncIterator[None]:
    """After each test (and its other fixtures), end the tasks it left, cancelling again until they end.

    nats-py awaits with asyncio.wait_for, which on Python 3.11 can swallow a cancel that arrives with the
    reply (https://github.com/python/cpython/issues/86296); the event loop's own close cancels each task
    once and then waits for ever, which hung a CI run. Here a task that outlives 10 s of cancels fails the
    test instead."""
    yield
    current = asyncio.current_task()
    tasks = {task for task in asyncio.all_tasks() if task is not current}
    deadline = asyncio.get_running_loop().time() + LEFTOVER_TASKS_TIMEOUT_S
    while tasks and asyncio.get_running_loop().time() < deadline:
        for task in tasks:
            task.cancel()
        _, tasks = await asyncio.wait(tasks, timeout=0.1)
    assert not tasks, f"tasks that would not end: {[task.get_coro() for task in tasks]}"
