"""`make bench-scale`: what a large store costs the whole stack, against the same stack with an empty store (issue 19).

One real stack (nats-server, session, moderation, llm_worker, edge) against the fake upstream. On the empty
store it measures: streamed /v1/chat turns (TTFT p50/p99, CPU per turn of each process), the agent queue and
the conversation lists (GET /v1/conversations?status=...), idle CPU of each process over `--idle-s`, RSS.
Then it seeds `--conversations` conversations straight into JetStream in the production format
(bench.session_idle.seed: metadata, index entries, a visitor message each and their timers; statuses mixed,
most closed, as a day's store is), from `--seed-procs` processes at once, and prints the seeding rate. Then it
restarts every process one after another (nats-server first) and times each until it is ready (nats-server:
JetStream answers; services: gRPC health SERVING; edge: /readyz ready), and measures the same figures again.
The handoff wait and idle close are set to a day, so no seeded timer comes due during the run: the idle
figures are the cost of what is stored, not of work coming due. Results: bench/results/scale-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import nats

from bench.chat_params import MODEL, BenchParams
from bench.chat_stack import start_stack, start_upstream
from bench.loadgen import LoadResult, LoadSpec, Target, percentile, run_load
from bench.open_streams import raise_open_files_limit
from bench.proc_stats import cpu_seconds, memory_mib
from bench.processes import bench_work_dir
from bench.processes import stop_process as stop_upstream
from bench.results_io import RESULTS_DIR, write_atomic
from bench.session_idle import seed
from bench.ws_idle_clients import SECRET_ENV
from bench.ws_idle_phase import read_json_line, tell
from bench.ws_latency_phase import latency_run
from bench.ws_params import WsBenchParams
from devtools.devstack.nats_server import start_nats_server
from devtools.devstack.stack import REPO_ROOT, SERVICES, Stack, StackConfig, StackPorts, free_port
from devtools.mint_token import mint
from services.session.schedule import TimerLimits

TENANTS = 10
TENANT = "t0"
"""Seeded conversations go to t0..t9; the turns and the lists run in t0, among a tenth of them."""
DAY_S = 24 * 3600.0
LIMITS = TimerLimits(wait_s=DAY_S, idle_s=DAY_S, retention_s=7 * DAY_S)
SEED_STATUSES = ("closed", "closed", "closed", "closed", "closed", "closed", "ai", "ai", "waiting_human", "human")
"""A day's store: most conversations closed, some open with the AI, some waiting for or with an agent."""
LIST_QUERIES = ("waiting_human", "human", "ai", "closed", "")
"""The agent queue first; "" is the list without a status filter."""
SOCKETS_PER_ADDRESS = 25_000
"""One source address runs out of ephemeral ports near 28k connections to one server port."""
OPEN_FILES = 1 << 20
"""RLIMIT_NOFILE wanted for the bench and the stack it starts (the hard limit too, where allowed: root)."""
LATENCY = WsBenchParams(rate=100.0, visitors=100, agents=4, duration_s=20.0, warmup_s=3.0)
"""Visitor-to-agent latency while the sockets are held: 100 messages/s among them (issue 19)."""


# ---------------------------------------------------------------- seeding


def _seed_part(url: str, count: int, first: int) -> float:
    return asyncio.run(seed(url, count, True, statuses=SEED_STATUSES, tenants=TENANTS, limits=LIMITS,
                            open_streams=False, first=first))


def seed_store(url: str, conversations: int, procs: int) -> dict[str, float]:
    """Seed from `procs` processes at once (each its own connection); wall seconds and the rate."""
    parts = [conversations // procs + (1 if n < conversations % procs else 0) for n in range(procs)]
    firsts = list(itertools.accumulate([0, *parts[:-1]]))
    started = time.monotonic()
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_seed_part, [url] * procs, parts, firsts))
    wall = time.monotonic() - started
    return {"conversations": conversations, "procs": procs, "seconds": round(wall, 1),
            "per_second": round(conversations / wall)}


# ---------------------------------------------------------------- readings


def pids_of(stack: Stack) -> dict[str, int]:
    assert stack.nats is not None
    return {**{name: process.pid for name, process in stack.processes.items()},
            "nats-server": stack.nats.process.pid}


def cpu_of(pids: Mapping[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) or 0.0 for name, pid in pids.items()}


def idle_cpu(stack: Stack, seconds: float) -> dict[str, float]:
    """Percent of one core each process used while nothing was asked of it."""
    pids = pids_of(stack)
    before = cpu_of(pids)
    time.sleep(seconds)
    after = cpu_of(pids)
    used = {name: round(100 * (after[name] - before[name]) / seconds, 2) for name in pids}
    return {**used, "total": round(sum(used.values()), 2)}


def rss_of(stack: Stack) -> dict[str, float]:
    rss = {name: memory_mib(pid).get("rss_mib", 0.0) for name, pid in pids_of(stack).items()}
    return {**rss, "total": round(sum(rss.values()), 1)}


# ---------------------------------------------------------------- turns and lists


def chat_target(edge_url: str, secret: str, phase: str) -> Target:
    """Streamed /v1/chat in tenant t0, a new conversation and a unique question per request (no cache hit)."""
    serial = itertools.count()
    tokens: dict[int, str] = {}

    def body(user: int, seq: int) -> Mapping[str, Any]:
        return {"message": f"您好，第 {user} 位顾客的第 {seq} 个问题（{phase} #{next(serial)}）：订单什么时候发货？",
                "stream": True}

    def headers(user: int) -> Mapping[str, str]:
        if user not in tokens:
            tokens[user] = mint(secret, tenant=TENANT, subject=f"scale-{phase}-{user}", role="visitor",
                                ttl_s=3600)
        return {"Authorization": f"Bearer {tokens[user]}"}

    return Target("kefu", f"{edge_url}/v1/chat", "kefu", body, headers)


def measure_turns(stack: Stack, secret: str, phase: str, turns: int, concurrency: int) -> dict[str, Any]:
    target = chat_target(stack.base_url, secret, phase)
    asyncio.run(run_load(target, LoadSpec(concurrency=concurrency, requests=max(concurrency, turns // 10))))
    pids = pids_of(stack)
    before = cpu_of(pids)
    result: LoadResult = asyncio.run(run_load(target, LoadSpec(concurrency=concurrency, requests=turns)))
    after = cpu_of(pids)
    done = max(1, result.succeeded)
    cpu_ms = {name: round(1e3 * (after[name] - before[name]) / done, 2) for name in pids}
    return {"turns": result.requests, "failed": result.failed, "errors": result.errors,
            "concurrency": concurrency, "ttft_p50_ms": result.ttft and round(result.ttft.p50 * 1e3, 1),
            "ttft_p99_ms": result.ttft and round(result.ttft.p99 * 1e3, 1),
            "total_p99_ms": result.total and round(result.total.p99 * 1e3, 1),
            "cpu_ms_per_turn": {**cpu_ms, "total": round(sum(cpu_ms.values()), 2)}}


async def _list_latency(edge_url: str, secret: str, requests: int) -> dict[str, dict[str, Any]]:
    token = mint(secret, tenant=TENANT, subject="scale-agent", role="agent", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    found: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession(headers=headers) as http:
        for status in LIST_QUERIES:
            url = f"{edge_url}/v1/conversations" + (f"?status={status}" if status else "")
            times: list[float] = []
            listed = 0
            for _ in range(requests):
                started = time.perf_counter()
                async with http.get(url) as response:
                    payload = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"GET {url}: {response.status} {payload}")
                times.append(time.perf_counter() - started)
                listed = len(payload["conversations"])
            found[status or "any"] = {"p50_ms": round(percentile(times, 50) * 1e3, 2),
                                      "p99_ms": round(percentile(times, 99) * 1e3, 2), "listed": listed}
    return found


def list_latency(stack: Stack, secret: str, requests: int) -> dict[str, dict[str, Any]]:
    return asyncio.run(_list_latency(stack.base_url, secret, requests))


def phase_figures(stack: Stack, secret: str, args: argparse.Namespace, phase: str) -> dict[str, Any]:
    return {"turns": measure_turns(stack, secret, phase, args.turns, args.concurrency),
            "lists": list_latency(stack, secret, args.list_requests),
            "idle_cpu_percent_of_a_core": idle_cpu(stack, args.idle_s),
            "rss_mib": rss_of(stack), "load_average": [round(value, 2) for value in os.getloadavg()]}


# ---------------------------------------------------------------- restart


async def _jetstream_answers(url: str, deadline: float) -> None:
    while True:
        try:
            nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=0)
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except Exception:  # noqa: BLE001 - anything short of an answer: not ready yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def restart_all(stack: Stack, timeout_s: float = 120.0) -> dict[str, float]:
    """Stop everything, then start each process alone and time it until ready (seconds)."""
    assert stack.nats is not None
    stack.stop()
    ready: dict[str, float] = {}
    store = stack.nats.store_dir
    started = time.monotonic()
    stack.nats = start_nats_server(store, port=stack.config.ports.nats, config_file=store / "nats.conf")
    asyncio.run(_jetstream_answers(stack.nats_url, started + timeout_s))
    ready["nats-server"] = time.monotonic() - started
    ports = stack.config.ports
    grpc_ports = {"session": ports.session, "moderation": ports.moderation, "llm_worker": ports.worker}
    for name in SERVICES:
        started = time.monotonic()
        stack.start_process(name)
        stack.wait_grpc_serving(name, grpc_ports[name], started + timeout_s)
        ready[name] = time.monotonic() - started
    for name in stack.config.edge_names:
        started = time.monotonic()
        stack.start_process(name)
        stack.wait_edge_ready(name, started + timeout_s)
        ready[name] = time.monotonic() - started
    return {name: round(seconds, 2) for name, seconds in ready.items()}


# ---------------------------------------------------------------- live sockets


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
    return {name: pid for name, pid in pids_of(stack).items() if name in stack.config.edge_names}


def socket_run(stack: Stack, secret: str, sockets: int, idle_s: float, first: int,
               per_address: int = SOCKETS_PER_ADDRESS, latency: WsBenchParams | None = LATENCY) -> dict[str, Any]:
    """`sockets` visitors, each with an open conversation seeded for it in t0 (visitor-`first`, ...), connect
    a WebSocket each (hello without resume continues the open conversation) from client processes on
    127.0.0.2, 127.0.0.3, ...; then, while they are held: the idle CPU and the RSS of every process, the
    edges' RSS per socket, the consumers on the conversation log, and the visitor-to-agent latency at
    `latency.rate` messages/s (bench/ws_bench.py's latency run, visitors and agents among the held sockets)."""
    asyncio.run(seed(stack.nats_url, sockets, True, statuses=("ai",), tenants=1, limits=LIMITS,
                     open_streams=False, first=first))
    addresses = math.ceil(sockets / per_address)
    counts = [sockets // addresses + (1 if n < sockets % addresses else 0) for n in range(addresses)]
    url = stack.base_url.replace("http", "ws", 1) + "/v1/ws"
    env = {**os.environ, SECRET_ENV: secret}
    clients: list[subprocess.Popen[bytes]] = []
    time.sleep(2.0)
    edges_before = {name: memory_mib(pid).get("rss_mib", 0.0) for name, pid in edge_pids(stack).items()}
    lat: dict[str, Any] | None = None
    try:
        for n, (count, start) in enumerate(zip(counts, itertools.accumulate([0, *counts[:-1]]), strict=True)):
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "bench.ws_idle_clients", "--url", url, "--first", str(first + start), "--count",
                 str(count), "--parallel", "100", "--local-address", f"127.0.0.{2 + n}",
                 "--tenant", TENANT, "--subject-prefix", "visitor-"],
                cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True))
        for client in clients:
            read_json_line(client, 300, "socket client start-up")
        started = time.monotonic()
        tell(clients, "go")
        opened = [read_json_line(client, 3600, "opening sockets") for client in clients]
        open_s = time.monotonic() - started
        time.sleep(5.0)
        idle = idle_cpu(stack, idle_s)
        rss = rss_of(stack)
        consumers = asyncio.run(_log_consumers(stack.nats_url))
        if latency is not None:
            try:
                lat = asyncio.run(latency_run(latency, "kefu", url, url, secret, pids_of(stack)))
            except (aiohttp.ClientError, OSError, TimeoutError) as failure:  # keep the figures taken so far
                lat = {"error": f"{type(failure).__name__}: {failure}"}
        tell(clients, "check")
        still = sum(read_json_line(client, 120, "check")["open"] for client in clients)
        tell(clients, "close")
        for client in clients:
            read_json_line(client, 600, "closing sockets")
    finally:
        for client in clients:
            stop_upstream(client)
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
        "still_open_after_idle": still, "idle_cpu_percent_of_a_core": idle, "rss_mib": rss,
        "edge_rss_before_mib": edges_before,
        "edge_kib_per_socket": round(edge_growth_mib * 1024 / held, 1) if held else None,
        "log_consumers": consumers}
    if lat is not None:
        figures["latency"] = {key: lat[key] for key in ("offered_rate", "messages", "received", "lost", "duplicates",
                                                       "latency_ms", "cpu_percent", "problems", "error") if key in lat}
    return figures


def socket_lines(live: Mapping[str, Any]) -> list[str]:
    lines = [f"Sockets: {live['opened']:,} of {live['sockets']:,} opened ({live['failed']} failed) on "
             f"{live['edges']} edge process(es) from {live['source_addresses']} source addresses in "
             f"{live['open_s']} s, {live['in_conversation']:,} in an open conversation; "
             f"{live['still_open_after_idle']:,} still open at the end",
             "idle CPU % of a core: " + ", ".join(f"{name} {value}" for name, value
                                                  in live["idle_cpu_percent_of_a_core"].items()),
             "RSS MiB: " + ", ".join(f"{name} {value}" for name, value in live["rss_mib"].items()),
             f"edge RSS per socket: {live['edge_kib_per_socket']} KiB; consumers on KEFU_MESSAGES: "
             f"{live['log_consumers']}"]
    if (lat := live.get("latency")) and "error" in lat:
        lines.append(f"visitor-to-agent latency run failed: {lat['error']}")
    elif lat:
        ms = lat["latency_ms"] or {}
        lines.append(f"visitor-to-agent at {lat['offered_rate']:g} msg/s among them: p50 {ms.get('p50', 0):.1f} ms, "
                     f"p99 {ms.get('p99', 0):.1f} ms, max {ms.get('max', 0):.1f} ms; {lat['received']} of "
                     f"{lat['messages']} received, {lat['duplicates']} duplicates, problems {lat['problems']}")
    return lines


# ---------------------------------------------------------------- report


def _ratio(mine: float | None, theirs: float | None) -> str:
    return f"{mine / theirs:.2f}" if mine and theirs else "-"


def render(report: Mapping[str, Any]) -> str:
    empty, full = report["empty"], report["stored"]
    n = report["seed"]["conversations"]
    lines = [f"# make bench-scale, {report['started']} ({n:,} conversations stored)", "",
             f"Seeding: {n:,} conversations in {report['seed']['seconds']} s "
             f"({report['seed']['per_second']:,}/s, {report['seed']['procs']} processes); "
             f"load average (1, 5, 15 min) at the end of the empty phase {report['empty']['load_average']}, "
             f"of the stored phase {report['stored']['load_average']} ({report['cpus']} CPUs)", "",
             "| figure | empty store | stored | stored / empty |", "|---|---|---|---|"]
    for key in ("ttft_p50_ms", "ttft_p99_ms", "total_p99_ms"):
        lines.append(f"| turn {key} | {empty['turns'][key]} | {full['turns'][key]} | "
                     f"{_ratio(full['turns'][key], empty['turns'][key])} |")
    for name, value in empty["turns"]["cpu_ms_per_turn"].items():
        mine = full["turns"]["cpu_ms_per_turn"].get(name)
        lines.append(f"| turn CPU ms, {name} | {value} | {mine} | {_ratio(mine, value)} |")
    for status, value in empty["lists"].items():
        mine = full["lists"][status]
        lines.append(f"| GET /v1/conversations {status}: p50 / p99 ms (listed) | {value['p50_ms']} / "
                     f"{value['p99_ms']} ({value['listed']}) | {mine['p50_ms']} / {mine['p99_ms']} "
                     f"({mine['listed']}) | {_ratio(mine['p99_ms'], value['p99_ms'])} |")
    for name, value in empty["idle_cpu_percent_of_a_core"].items():
        mine = full["idle_cpu_percent_of_a_core"].get(name)
        lines.append(f"| idle CPU % of a core, {name} | {value} | {mine} | {_ratio(mine, value)} |")
    for name, value in empty["rss_mib"].items():
        mine = full["rss_mib"].get(name)
        lines.append(f"| RSS MiB, {name} | {value} | {mine} | {_ratio(mine, value)} |")
    lines += ["", "Ready after a restart (s), each process alone: "
              + ", ".join(f"{name} {seconds}" for name, seconds in report["ready_after_restart_s"].items())]
    failed = empty["turns"]["failed"] + full["turns"]["failed"]
    lines.append(f"Failed turns: {failed}")
    if live := report.get("sockets"):
        lines += ["", *socket_lines(live)]
    return "\n".join(lines) + "\n"


def run_sockets_only(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    secret = os.urandom(32).hex()
    upstream, upstream_url = start_upstream(BenchParams(), work_dir / "upstream.log")
    try:
        stack = start_socket_stack(work_dir, upstream_url, secret, args.edges, args.ws_heartbeat_s)
        try:
            time.sleep(5.0)
            idle = idle_cpu(stack, min(args.idle_s, 20.0))
            return {"sockets": socket_run(stack, secret, args.sockets, args.idle_s, 0, args.sockets_per_address),
                    "idle_before_sockets": idle, "ws_heartbeat_s": args.ws_heartbeat_s}
        finally:
            stack.stop()
    finally:
        stop_upstream(upstream)


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    if args.sockets_only:
        return run_sockets_only(args, work_dir)
    secret = os.urandom(32).hex()
    upstream, upstream_url = start_upstream(BenchParams(), work_dir / "upstream.log")
    try:
        stack = start_stack(work_dir, upstream_url, secret, {
            "KEFU_HANDOFF_WAIT_S": str(LIMITS.wait_s), "KEFU_IDLE_CLOSE_S": str(LIMITS.idle_s),
            "KEFU_CACHE_ENABLED": "false"})
        try:
            time.sleep(5.0)  # past start-up: the idle state
            empty = phase_figures(stack, secret, args, "empty")
            seeded = seed_store(stack.nats_url, args.conversations, args.seed_procs)
            print(f"seeded {seeded['conversations']:,} conversations in {seeded['seconds']} s "
                  f"({seeded['per_second']:,}/s)", flush=True)
            ready = restart_all(stack)
            time.sleep(5.0)
            stored = phase_figures(stack, secret, args, "stored")
            live = None
            if args.sockets:
                live = socket_run(stack, secret, args.sockets, args.idle_s, args.conversations,
                                  args.sockets_per_address)
        finally:
            stack.stop()
    finally:
        stop_upstream(upstream)
    return {"seed": seeded, "ready_after_restart_s": ready, "empty": empty, "stored": stored, "sockets": live}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--seed-procs", type=int, default=2, help="seeding processes (each its own connection)")
    parser.add_argument("--turns", type=int, default=200, help="streamed turns measured on each store")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--list-requests", type=int, default=50, help="GET /v1/conversations per status")
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--sockets", type=int, default=0,
                        help="then hold this many visitor sockets, each with an open conversation (0: none)")
    parser.add_argument("--sockets-per-address", type=int, default=SOCKETS_PER_ADDRESS,
                        help="sockets per source address (127.0.0.2, .3, ...), one client process each")
    parser.add_argument("--sockets-only", action="store_true",
                        help="only the socket run (no million-conversation store): --sockets on --edges edges")
    parser.add_argument("--edges", type=int, default=1,
                        help="edge processes sharing the port in the --sockets-only run (KEFU_GATEWAY_WORKERS)")
    parser.add_argument("--ws-heartbeat-s", type=float, default=30.0,
                        help="KEFU_WS_HEARTBEAT_S in the --sockets-only run: the edge pings every socket this often")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    if min(args.conversations, args.seed_procs, args.turns, args.concurrency, args.list_requests,
           args.sockets_per_address) < 1 or args.sockets < 0:
        parser.error("--conversations, --seed-procs, --turns, --concurrency, --list-requests and "
                     "--sockets-per-address must be >= 1, --sockets >= 0")
    if args.sockets_only and not args.sockets or args.edges < 1:
        parser.error("--sockets-only needs --sockets; --edges must be >= 1")
    _soft, hard = raise_open_files()  # the stack's processes inherit it: the edge holds a descriptor per socket
    if args.sockets_only and max(args.sockets / args.edges * 1.15, args.sockets_per_address) > hard - 500:
        # The kernel spreads sockets over the edges unevenly (SO_REUSEPORT hashing): leave room.
        parser.error(f"RLIMIT_NOFILE is {hard} here: use more --edges and a lower --sockets-per-address")
    started = datetime.now(UTC)
    with bench_work_dir("kefu-scale-", args.keep_logs) as work:
        figures = run(args, work.path)
    report = {"started": started.isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "load_average": [round(value, 2) for value in os.getloadavg()], **figures}
    title = f"# make bench-scale --sockets-only, {report['started']} (KEFU_WS_HEARTBEAT_S {args.ws_heartbeat_s:g})"
    markdown = ("\n".join([title, "", *socket_lines(figures["sockets"])]) + "\n") if args.sockets_only \
        else render(report)
    print(markdown)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(args.results_dir / f"scale-{stamp}.json", json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
