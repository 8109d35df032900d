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
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import nats

from bench.chat_params import BenchParams
from bench.chat_stack import start_stack, start_upstream
from bench.loadgen import LoadResult, LoadSpec, Target, percentile, run_load
from bench.proc_stats import cpu_of, idle_cpu_percent, rss_of, stack_pids
from bench.processes import bench_work_dir
from bench.processes import stop_process as stop_upstream
from bench.results_io import RESULTS_DIR, write_atomic
from bench.scale_params import LIMITS, LIST_QUERIES, NATS, SEED_STATUSES, SOCKETS_PER_ADDRESS, TENANT, TENANTS
from bench.scale_report import render, socket_lines
from bench.scale_sockets import raise_open_files, socket_run, start_socket_stack
from bench.session_idle import seed
from devtools.devstack.nats_server import start_nats_server
from devtools.devstack.stack import SERVICES, Stack
from devtools.mint_token import mint

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
    pids = stack_pids(stack, NATS)
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
            "idle_cpu_percent_of_a_core": idle_cpu_percent(stack_pids(stack, NATS), args.idle_s),
            "rss_mib": rss_of(stack_pids(stack, NATS)), "load_average": [round(value, 2) for value in os.getloadavg()]}


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


NATS_STOP_S = 60.0
"""How long nats-server may take to stop before it is killed: a clean stop writes each stream's index
(index.db) that the next start reads instead of every block (production: 60 s of grace, k8s nats.yaml)."""


def restart_all(stack: Stack, timeout_s: float = 120.0) -> tuple[dict[str, float], dict[str, float]]:
    """Stop everything, then start each process alone and time it until ready (seconds); and what
    nats-server's stop and start took: its stop's seconds, the CPU seconds and RSS of its start."""
    assert stack.nats is not None
    server, stack.nats = stack.nats, None
    stack.stop()  # the kefu processes
    started = time.monotonic()
    server.stop(NATS_STOP_S)
    nats_figures = {"stop_s": round(time.monotonic() - started, 2)}
    ready: dict[str, float] = {}
    store = server.store_dir
    started = time.monotonic()
    stack.nats = start_nats_server(store, port=stack.config.ports.nats, config_file=store / "nats.conf")
    asyncio.run(_jetstream_answers(stack.nats_url, started + timeout_s))
    ready["nats-server"] = time.monotonic() - started
    pid = stack.nats.process.pid
    nats_figures |= {"start_cpu_s": round(sum(cpu_of({NATS: pid}).values()), 2),
                     "start_rss_mib": rss_of({NATS: pid})[NATS]}
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
    return {name: round(seconds, 2) for name, seconds in ready.items()}, nats_figures


# ---------------------------------------------------------------- main


def run_sockets_only(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    secret = os.urandom(32).hex()
    upstream, upstream_url = start_upstream(BenchParams(), work_dir / "upstream.log")
    try:
        stack = start_socket_stack(work_dir, upstream_url, secret, args.edges, args.ws_heartbeat_s)
        try:
            time.sleep(5.0)
            idle = idle_cpu_percent(stack_pids(stack, NATS), min(args.idle_s, 20.0))
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
            ready, nats_restart = restart_all(stack)
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
    return {"seed": seeded, "ready_after_restart_s": ready, "nats_server_restart": nats_restart, "empty": empty,
            "stored": stored, "sockets": live}


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
