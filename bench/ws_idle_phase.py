"""Live-chat phase 1: idle sockets held on one server by client processes; connect rate, RSS and CPU per socket."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp

from bench.loadgen import percentile
from bench.open_streams import open_files, open_files_limit
from bench.proc_stats import cpu_seconds, memory_mib
from bench.processes import read_line, stop_process
from bench.ws_frames import FRAME_TIMEOUT_S
from bench.ws_idle_clients import SECRET_ENV, TENANT
from bench.ws_params import WsBenchParams
from devtools.devstack.stack import REPO_ROOT
from devtools.mint_token import mint

FD_HEADROOM = 256
"""Descriptors an edge needs besides its sockets (gRPC channels, NATS, logs, the listener)."""


def read_json_line(process: subprocess.Popen[bytes], timeout_s: float, what: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(read_line(process, timeout_s, what))
    return record


def tell(processes: Sequence[subprocess.Popen[bytes]], line: str) -> None:
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(line.encode() + b"\n")
        process.stdin.flush()


def capped_sockets(wanted: int, server_pid: int, client_processes: int) -> tuple[int, str | None]:
    """As many sockets as the open-file limits allow: the server's, and the clients' (each client process
    raises its soft limit to the hard one, which it inherits from this process)."""
    server = open_files_limit(server_pid)
    clients = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = [limit - FD_HEADROOM for limit in (server,) if limit is not None]
    if clients != resource.RLIM_INFINITY:
        limits.append((clients - FD_HEADROOM) * client_processes)
    if not limits or wanted <= min(limits):
        return wanted, None
    capped = max(1, min(limits))
    return capped, (f"open-file limits (server {server}, each client process {clients}): {wanted} sockets asked, "
                    f"{capped} opened (raise the hard limit, `ulimit -Hn`, or add --client-processes)")


def warm_up_sockets(url: str, mode: str, secret: str, count: int = 200) -> None:
    """Open and close some sockets first: imports, caches and allocator arenas are not per-socket cost."""
    async def warm() -> None:
        async with aiohttp.ClientSession() as http:
            async def one(number: int) -> None:
                hello: dict[str, Any] = {"type": "hello"}
                if mode == "kefu":
                    hello["token"] = mint(secret, tenant=TENANT, subject=f"warm-{number}", role="visitor")
                async with http.ws_connect(url) as ws:
                    await ws.send_str(json.dumps(hello))
                    await ws.receive(timeout=FRAME_TIMEOUT_S)
            await asyncio.gather(*(one(n) for n in range(count)))
    asyncio.run(warm())
    time.sleep(1.0)  # let the server finish closing them


def idle_phase(params: WsBenchParams, url: str, server_pid: int, mode: str, secret: str) -> dict[str, Any]:
    sockets, capped = capped_sockets(params.sockets, server_pid, params.client_processes)
    warm_up_sockets(url, mode, secret)
    share, rest = divmod(sockets, params.client_processes)
    counts = [share + (1 if i < rest else 0) for i in range(params.client_processes)]
    env = {**os.environ, SECRET_ENV: secret}
    clients: list[subprocess.Popen[bytes]] = []
    first = 0
    try:
        for count in counts:
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "bench.ws_idle_clients", "--url", url, "--mode", mode, "--first", str(first),
                 "--count", str(count), "--parallel", str(params.connect_parallel)],
                cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True))
            first += count
        for client in clients:
            read_json_line(client, 120, "idle client start-up")
        before = memory_mib(server_pid)
        files_before = open_files(server_pid)
        cpu_before = cpu_seconds(server_pid)
        clients_cpu_before = sum(cpu_seconds(c.pid) or 0.0 for c in clients)
        started = time.perf_counter()
        tell(clients, "go")
        opened = [read_json_line(client, 600, "opening sockets") for client in clients]
        connect_s = time.perf_counter() - started
        cpu_open = cpu_seconds(server_pid)
        clients_cpu = sum(cpu_seconds(c.pid) or 0.0 for c in clients) - clients_cpu_before
        at_open = memory_mib(server_pid)
        files_open = open_files(server_pid)
        time.sleep(params.hold_s)
        cpu_held = cpu_seconds(server_pid)
        held = memory_mib(server_pid)
        tell(clients, "check")
        checks = [read_json_line(client, 60, "checking sockets") for client in clients]
        tell(clients, "close")
        for client in clients:
            read_json_line(client, 120, "closing sockets")
            client.wait(30)
    finally:
        for client in clients:
            stop_process(client)
    time.sleep(1.0)
    after_close = memory_mib(server_pid)
    total: int = sum(o["opened"] for o in opened)
    errors: Counter[str] = Counter()
    for o in opened:
        errors.update(o["errors"])
    close_codes: Counter[str] = Counter()
    for c in checks:
        close_codes.update(c["close_codes"])
    connect_ms = sorted(v for o in opened for v in o["connect_ms"])

    def per_socket(reading: dict[str, float]) -> float | None:
        if not total or "rss_mib" not in reading or "rss_mib" not in before:
            return None
        return (reading["rss_mib"] - before["rss_mib"]) * 1024 / total

    cpu_hold = None
    if cpu_open is not None and cpu_held is not None and params.hold_s > 0:
        cpu_hold = (cpu_held - cpu_open) * 100 / params.hold_s
    return {
        "mode": mode, "asked": params.sockets, "sockets": sockets, "capped": capped, "opened": total,
        "failed": sum(o["failed"] for o in opened), "errors": dict(errors.most_common(5)),
        "connect_seconds": connect_s, "connect_rate": total / connect_s if connect_s else None,
        "connect_ms": {"p50": percentile(connect_ms, 50), "p99": percentile(connect_ms, 99)} if connect_ms else None,
        "cpu_seconds_opening": None if cpu_open is None or cpu_before is None else cpu_open - cpu_before,
        "client_cpu_seconds_opening": clients_cpu,
        "cpu_percent_holding": cpu_hold,
        "still_open_after_hold": sum(c["open"] for c in checks), "close_codes": dict(close_codes),
        "rss_mib": {"before": before.get("rss_mib"), "opened": at_open.get("rss_mib"), "held": held.get("rss_mib"),
                    "after_close": after_close.get("rss_mib"), "peak": held.get("peak_mib")},
        "kib_per_socket": {"opened": per_socket(at_open), "held": per_socket(held)},
        "open_files": {"before": files_before, "opened": files_open},
    }
