"""KEFU_GATEWAY_WORKERS: several edge processes share the HTTP port (SO_REUSEPORT); losing one leaves it served."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from devtools.devstack.stack import (
    REPO_ROOT,
    TCP_ESTABLISHED,
    Stack,
    listening_pids,
    listens_on,
    sockets_by_pid,
)
from tests.e2e.stack_helpers import start_stack, wait_until

CONNECTIONS = 64
"""Held at once: the kernel hashes each to a worker, so all 64 landing on one of two is a 2**-63 chance."""


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("two-workers"), workers=2)
    try:
        yield stack
    finally:
        stack.stop()


def edge_pids(stack: Stack) -> list[int]:
    return [stack.processes[name].pid for name in stack.config.edge_names]


async def hold_connections(url: str, count: int) -> tuple[aiohttp.ClientSession, list[aiohttp.ClientResponse]]:
    """`count` keep-alive connections, each with one finished request, held open by the caller."""
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    async def one() -> aiohttp.ClientResponse:
        response = await http.get(url)
        await response.read()
        return response

    # Concurrent requests each need their own connection; reading the body without releasing the
    # response keeps the connection out of the pool, so it stays open and unshared.
    responses = list(await asyncio.gather(*(one() for _ in range(count))))
    return http, responses


async def test_workers_share_the_port_and_each_takes_connections(two_workers: Stack) -> None:
    port = two_workers.config.ports.http
    pids = edge_pids(two_workers)
    assert len(set(pids)) == 2
    assert set(pids) <= listening_pids(port)
    http, responses = await hold_connections(f"{two_workers.base_url}/healthz", CONNECTIONS)
    try:
        assert {r.status for r in responses} == {200}
        held = sockets_by_pid(pids, port, TCP_ESTABLISHED)
        assert sum(held.values()) == CONNECTIONS
        assert all(count > 0 for count in held.values()), held
    finally:
        for response in responses:
            response.release()
        await http.close()


async def test_killing_one_worker_leaves_the_port_served_and_it_comes_back(two_workers: Stack) -> None:
    port = two_workers.config.ports.http
    name = two_workers.config.edge_names[1]
    survivor = two_workers.processes[two_workers.config.edge_names[0]].pid
    two_workers.kill(name)
    assert listening_pids(port) & set(edge_pids(two_workers)) == {survivor}
    # Fresh connections (no keep-alive) are each hashed anew: all of them land on the survivor.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(20):
            async with http.get(f"{two_workers.base_url}/readyz") as response:
                assert response.status == 200
    # Started again with the same argv and env, it shares the port again.
    restarted = two_workers.start_process(name)
    wait_until(lambda: listens_on(restarted.pid, port), what="the restarted worker listening")
    assert set(edge_pids(two_workers)) <= listening_pids(port)


def test_a_lone_edge_does_not_share_its_port(tmp_path: Path) -> None:
    """Without KEFU_GATEWAY_WORKERS > 1 the bind is exclusive: a stray second edge fails at start."""
    stack = start_stack(tmp_path)
    try:
        env = {**stack.environment(), "KEFU_LOG_LEVEL": "WARNING"}
        stray = subprocess.run([sys.executable, "-m", "gateway"], cwd=REPO_ROOT, env=env, capture_output=True,
                               text=True, timeout=60)
        assert stray.returncode != 0
        assert "address already in use" in stray.stderr.lower() + stray.stdout.lower()
        with urllib.request.urlopen(f"{stack.base_url}/healthz", timeout=5) as reply:
            assert reply.status == 200
    finally:
        stack.stop()
