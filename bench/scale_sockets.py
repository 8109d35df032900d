"""The scale bench's live sockets: many idle WebSockets over several edges and addresses, and their cost."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats

from bench.chat_params import MODEL
from bench.open_streams import raise_open_files_limit
from bench.proc_stats import idle_cpu_percent, memory_mib, pss_of, rss_of, stack_pids
from bench.processes import stop_process
from bench.scale_params import LATENCY, LIMITS, NATS, OPEN_FILES, SOCKETS_PER_ADDRESS, TENANT
from bench.session_idle import seed
from bench.ws_idle_clients import SECRET_ENV
from bench.ws_idle_phase import read_json_line, tell
from bench.ws_latency_phase import latency_run
from bench.ws_params import WsBenchParams
from devtools.devstack.stack import REPO_ROOT, Stack, StackConfig, StackPorts, free_port

OPENING_AT_ONCE = 200
"""Hellos in flight over all client processes while the sockets open."""


def raise_open_files(wanted: int = OPEN_FILES) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to `wanted`, the hard limit too when allowed (children inherit it); (soft, hard)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
    except (ValueError, OSError):
        raise_open_files_limit()  # not root: as far as the hard limit goes
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def start_socket_stack(work_dir: Path, upstream_url: str, secret: str, edges: int, heartbeat_s: float) -> Stack:
    """The stack with `edges` edge processes sharing the public port (SO_REUSEPORT spreads the sockets)."""
    plugins = shutil.copytree(REPO_ROOT / "plugins", work_dir / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"KEFU_PLUGINS_DIR": str(plugins), "KEFU_OPENAI_BASE_URL": upstream_url, "KEFU_MODEL": MODEL,
           "KEFU_RATE_LIMIT_RPS": "100000", "KEFU_RATE_LIMIT_BURST": "100000",
           "KEFU_TENANT_RATE_LIMIT_RPS": "100000", "KEFU_WS_FRAME_RPS": "100000", "KEFU_WS_FRAME_BURST": "100000",
           "KEFU_VISITOR_MSG_RPS": "1000", "KEFU_VISITOR_MSG_BURST": "100000",
           "KEFU_CONN_GUARD": "false",  # thousands of sockets from a few addresses (bench.security_bench measures it)
           "KEFU_VISITOR_MAX_CONVERSATIONS": "1000", "KEFU_SHUTDOWN_GRACE_S": "2",
           "KEFU_HANDOFF_WAIT_S": str(LIMITS.wait_s), "KEFU_IDLE_CLOSE_S": str(LIMITS.idle_s),
           "KEFU_CACHE_ENABLED": "false", "KEFU_LOG_LEVEL": "WARNING", "KEFU_WS_HEARTBEAT_S": f"{heartbeat_s:g}",
           "KEFU_EDGE_METRICS_PORT": str(free_port())}
    stack = Stack(StackConfig(data_dir=work_dir, jwt_secret=secret, ports=StackPorts.free(), env=env,
                              log_dir=work_dir / "logs", gateway_workers=edges))
    stack.start()
    return stack


async def _log_consumers(url: str) -> int:
    """Consumers on the conversation log right now: one per edge process, not one per conversation."""
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0)
    try:
        return (await nc.jetstream().stream_info("KEFU_MESSAGES")).state.consumer_count
    finally:
        await nc.close()


def edge_pids(stack: Stack) -> dict[str, int]:
    return {name: pid for name, pid in stack_pids(stack, NATS).items() if name in stack.config.edge_names}


def socket_run(stack: Stack, secret: str, sockets: int, idle_s: float, first: int,
               per_address: int = SOCKETS_PER_ADDRESS, latency: WsBenchParams | None = LATENCY) -> dict[str, Any]:
    """`sockets` visitors, each with an open conversation seeded for it in t0 (visitor-`first`, ...), connect
    a WebSocket each (hello without resume continues the open conversation) from client processes on
    127.0.0.2, 127.0.0.3, ...; then, while they are held: the idle CPU and the RSS of every process, the
    edges' RSS per socket, the consumers on the conversation log, and the visitor-to-agent latency at
    `latency.rate` messages/s (bench/ws_latency_phase.py's run, visitors and agents among the held sockets)."""
    # Answered conversations: a socket joining owes no AI answer, so opening measures sockets, not LLM turns.
    asyncio.run(seed(stack.nats_url, sockets, True, statuses=("ai",), tenants=1, limits=LIMITS,
                     open_streams=False, first=first, answered=True))
    addresses = math.ceil(sockets / per_address)
    counts = [sockets // addresses + (1 if n < sockets % addresses else 0) for n in range(addresses)]
    url = stack.base_url.replace("http", "ws", 1) + "/v1/ws"
    env = {**os.environ, SECRET_ENV: secret}
    clients: list[subprocess.Popen[bytes]] = []
    # About OPENING_AT_ONCE hellos in flight over all clients: more only queue at the session service, past
    # their deadline (a 100,000-socket run with 2,000 at once lost half of its hellos to it).
    parallel = max(5, OPENING_AT_ONCE // addresses)
    time.sleep(2.0)
    edges_before = {name: memory_mib(pid).get("rss_mib", 0.0) for name, pid in edge_pids(stack).items()}
    lat: dict[str, Any] | None = None
    try:
        for n, (count, start) in enumerate(zip(counts, itertools.accumulate([0, *counts[:-1]]), strict=True)):
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "bench.ws_idle_clients", "--url", url, "--first", str(first + start), "--count",
                 str(count), "--parallel", str(parallel), "--local-address", f"127.0.0.{2 + n}",
                 "--tenant", TENANT, "--subject-prefix", "visitor-"],
                cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True))
        for client in clients:
            read_json_line(client, 300, "socket client start-up")
        started = time.monotonic()
        tell(clients, "go")
        opened = [read_json_line(client, 3600, "opening sockets") for client in clients]
        open_s = time.monotonic() - started
        time.sleep(5.0)
        idle = idle_cpu_percent(stack_pids(stack, NATS), idle_s)
        rss = rss_of(stack_pids(stack, NATS))
        pss = pss_of(stack_pids(stack, NATS))
        consumers = asyncio.run(_log_consumers(stack.nats_url))
        if latency is not None:
            try:
                lat = asyncio.run(latency_run(latency, "kefu", url, url, secret, stack_pids(stack, NATS)))
            except (aiohttp.ClientError, OSError, TimeoutError) as failure:  # keep the figures taken so far
                lat = {"error": f"{type(failure).__name__}: {failure}"}
        tell(clients, "check")
        still = sum(read_json_line(client, 120, "check")["open"] for client in clients)
        tell(clients, "close")
        for client in clients:
            read_json_line(client, 600, "closing sockets")
    finally:
        for client in clients:
            stop_process(client)
    errors: dict[str, int] = {}
    for record in opened:
        for error, count in record["errors"].items():
            errors[error] = errors.get(error, 0) + count
    held = sum(r["opened"] for r in opened)
    edge_growth_mib = sum(rss.get(name, 0.0) - before for name, before in edges_before.items())
    figures: dict[str, Any] = {
        "sockets": sockets, "edges": len(edges_before), "source_addresses": addresses, "opened": held,
        "failed": sum(r["failed"] for r in opened), "errors": errors,
        "in_conversation": sum(r["in_conversation"] for r in opened), "open_s": round(open_s, 1),
        "still_open_after_idle": still, "idle_cpu_percent_of_a_core": idle, "rss_mib": rss, "pss_mib": pss,
        "edge_rss_before_mib": edges_before,
        "edge_kib_per_socket": round(edge_growth_mib * 1024 / held, 1) if held else None,
        "log_consumers": consumers}
    if lat is not None:
        figures["latency"] = {key: lat[key] for key in ("offered_rate", "messages", "received", "lost", "duplicates",
                                                       "latency_ms", "cpu_percent", "problems", "error") if key in lat}
    return figures
