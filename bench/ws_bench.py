"""`python -m bench.ws_bench` (`make bench-ws`): live chat over /v1/ws against a plain aiohttp relay.

One kefu stack (nats-server, the three services, one edge on the stack's port and a second edge
process on a port of its own; the offline knowledge-base plugin answers), and the floor: a plain
aiohttp WebSocket relay (bench/ws_floor.py, one process, no auth, no storage). Phases:

1. idle: `--sockets` visitor WebSockets (hello with a token of their own, then welcome) opened
   against ONE edge process by `--client-processes` client processes, then held idle for
   `--hold-s` while the edge pings each every KEFU_WS_HEARTBEAT_S (`--heartbeat-s`). Reported:
   connect rate (sockets / wall time from go to the last welcome), the edge's RSS per idle
   socket ((VmRSS held - VmRSS before) / sockets), and how many sockets survived the hold. The
   same against the floor.
2. resume: one visitor conversation gets `--resume-events` stored events it misses (sent on
   another socket of the same visitor; every send also stores the AI's answer, so stored events
   are counted, not sends); then a new socket times `hello {resume: [{conversation_id,
   after_seq}]}` until the last missed event arrives, `--resume-rounds` times (median). `cold`:
   no other socket of the conversation on that edge (the replay is read from the session
   service, then the edge follows the conversation's JetStream log); `warm`: another tab of the
   visitor keeps the conversation's feed open on the edge.
   The direct path is one ListMessages call to the session service for the same events.
3. latency: `--visitors` visitors on edge A hand their conversations off, `--agents` agents on
   edge B claim them; then the visitors send `--rate` messages/s in total (open loop, spread
   evenly) for `--duration-s` seconds after `--warmup-s`, and the time from a visitor's send to
   the agent receiving the stored `msg` is measured (one client process, one clock). The floor
   relays the same frames between the same sockets inside one process. Before it, kefu alone at
   each `--sweep` rate (fresh visitors and agents each time): the highest rate whose p99 stays
   within 50 ms. After it, bench/grpc_floor.py at `--rate`: what two empty unary gRPC calls per
   message cost, the part of kefu's CPU the edge-to-services shape itself takes.

Results: bench/results/ws-<UTC>.json (with the markdown), and the markdown on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import resource
import secrets
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench import grpc_floor
from bench.__main__ import RESULTS_DIR, _write, cpu_seconds, memory_mib, stop_process
from bench.arrivals import arrival_offsets, highest_within
from bench.edge_bench import log_problems, machine_busy_seconds
from bench.loadgen import percentile
from bench.open_streams import open_files, open_files_limit, raise_open_files_limit
from bench.processes import bench_work_dir
from bench.ws_idle_clients import SECRET_ENV, TENANT
from devtools.devstack.stack import REPO_ROOT, Stack, StackConfig, StackPorts, free_port
from devtools.mint_token import mint
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel

log = logging.getLogger("bench.ws")

PHASES = ("idle", "resume", "latency")
QUESTION = "下单后多久发货？"
"""A question the knowledge base answers, so the AI stores an answer and no handoff starts."""
FD_HEADROOM = 256
"""Descriptors an edge needs besides its sockets (gRPC channels, NATS, logs, the listener)."""
FRAME_TIMEOUT_S = 30.0
QUIET_S = 10.0
"""The latency run stops waiting for queued messages after this long without one arriving."""
IDLE_WINDOW_S = 3.0
"""Before sending, the latency run measures the CPU of the idle set-up for this long."""


@dataclass(frozen=True, slots=True)
class WsBenchParams:
    sockets: int = 10_000
    client_processes: int = 2
    connect_parallel: int = 100
    """Handshakes in flight at once, per client process."""
    heartbeat_s: float = 30.0
    """KEFU_WS_HEARTBEAT_S during the run (and the floor's); the edge's default. A short one on a busy
    2-core machine closes sockets whose pong is late (aiohttp waits heartbeat / 2 for it)."""
    hold_s: float = 35.0
    """Longer than the heartbeat: every held socket is pinged, and answers, at least once."""
    resume_events: tuple[int, ...] = (50, 500)
    resume_rounds: int = 7
    rate: float = 500.0
    """Visitor messages per second, all visitors together."""
    sweep: tuple[float, ...] = (100.0, 200.0, 300.0)
    """Further rates measured for kefu alone after `rate`: where p99 stays within 50 ms."""
    visitors: int = 200
    agents: int = 4
    duration_s: float = 20.0
    warmup_s: float = 3.0
    phases: tuple[str, ...] = PHASES
    floor: bool = True
    send_queue: int | None = None
    """KEFU_WS_SEND_QUEUE for the run; None keeps the edge's default."""

    def __post_init__(self) -> None:
        if self.sockets < 1 or self.client_processes < 1 or self.connect_parallel < 1:
            raise ValueError("--sockets, --client-processes and --connect-parallel must be >= 1")
        if not self.phases or not set(self.phases) <= set(PHASES):
            raise ValueError(f"--phases must be a subset of {PHASES}, got {self.phases}")
        if not self.resume_events or min(self.resume_events) < 2 or self.resume_rounds < 1:
            raise ValueError("--resume-events must be >= 2 and --resume-rounds >= 1")
        if self.rate <= 0 or any(r <= 0 for r in self.sweep) or self.visitors < 1 or self.agents < 1 \
                or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("--rate, --visitors, --agents and --duration-s must be positive")
        if self.heartbeat_s < 1 or self.hold_s < 0:
            raise ValueError("--heartbeat-s must be >= 1 and --hold-s >= 0")


QUICK = WsBenchParams(sockets=1000, hold_s=6.0, heartbeat_s=5.0, resume_rounds=3, rate=200.0, sweep=(100.0,),
                      visitors=50, agents=2, duration_s=5.0, warmup_s=1.0)


def parse_args(argv: Sequence[str] | None) -> tuple[WsBenchParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, help="idle sockets on one edge process (default 10000)")
    parser.add_argument("--client-processes", type=int, help="client processes holding them (default 2)")
    parser.add_argument("--connect-parallel", type=int, help="handshakes in flight per client process (100)")
    parser.add_argument("--heartbeat-s", type=float, help="KEFU_WS_HEARTBEAT_S for the run (default 30)")
    parser.add_argument("--hold-s", type=float, help="how long the idle sockets are held (default 35)")
    parser.add_argument("--resume-events", help="comma-separated missed stored events (default 50,500)")
    parser.add_argument("--resume-rounds", type=int, help="timed resumes per size and case (default 7)")
    parser.add_argument("--rate", type=float, help="visitor messages per second in total (default 500)")
    parser.add_argument("--sweep", help="comma-separated further rates for kefu alone (default 100,200,300; '' none)")
    parser.add_argument("--visitors", type=int, help="visitors (conversations) sending (default 200)")
    parser.add_argument("--agents", type=int, help="agents sharing the claimed conversations (default 4)")
    parser.add_argument("--duration-s", type=float, help="measured seconds at the rate (default 20)")
    parser.add_argument("--warmup-s", type=float, help="unreported seconds at the rate first (default 3)")
    parser.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--no-floor", action="store_true", help="skip the plain aiohttp relay")
    parser.add_argument("--send-queue", type=int, help="KEFU_WS_SEND_QUEUE for the run (default: the edge's)")
    parser.add_argument("--quick", action="store_true", help="1000 sockets, short phases: about a minute")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary data and log folder")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else WsBenchParams()
    names = ("sockets", "client_processes", "connect_parallel", "heartbeat_s", "hold_s", "resume_rounds",
             "rate", "visitors", "agents", "duration_s", "warmup_s", "send_queue")
    overrides: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        if args.resume_events:
            overrides["resume_events"] = tuple(int(n) for n in args.resume_events.split(",") if n.strip())
        if args.sweep is not None:
            overrides["sweep"] = tuple(float(n) for n in args.sweep.split(",") if n.strip())
        if args.phases:
            overrides["phases"] = tuple(p.strip() for p in args.phases.split(",") if p.strip())
        if args.no_floor:
            overrides["floor"] = False
        return replace(base, **overrides), args
    except ValueError as error:
        parser.error(str(error))


# ---------------------------------------------------------------- processes


def start_ws_stack(work_dir: Path, secret: str, params: WsBenchParams, attempts: int = 3) -> Stack:
    """The offline knowledge-base stack on free ports, plus a second edge process on a port of its own."""
    plugins = shutil.copytree(REPO_ROOT / "plugins", work_dir / "plugins",
                              ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    # The knowledge base paces its answer (20 ms a chunk) like a model would; this bench measures
    # the live-chat path, not that pace, and producing 500 events would take minutes with it.
    routes = plugins / "routes.toml"
    # The bundled routes answer each tenant from its own documents; this bench's tenant has none, so its
    # route names the sample FAQ (every tenant of the stack then gets the tea shop's answers).
    text = routes.read_text().replace("chunk_delay_s = 0.02", "chunk_delay_s = 0")
    routes.write_text(text.replace("settings]\n", 'settings]\nfaq_file = "shop_faq.json"\n'))
    env = {
        "KEFU_PLUGINS_DIR": str(plugins),
        # Limits high enough never to refuse: the bench measures the path, not the limiters.
        "KEFU_RATE_LIMIT_RPS": "100000", "KEFU_RATE_LIMIT_BURST": "100000", "KEFU_TENANT_RATE_LIMIT_RPS": "100000",
        "KEFU_WS_FRAME_RPS": "100000", "KEFU_WS_FRAME_BURST": "100000",
        "KEFU_VISITOR_MSG_RPS": "1000", "KEFU_VISITOR_MSG_BURST": "100000",  # a bench visitor outpaces a person
        "KEFU_CONN_GUARD": "false",  # a crowd of sockets from one address (bench.security_bench measures the guard)
        "KEFU_SHUTDOWN_GRACE_S": "2",
        "KEFU_WS_HEARTBEAT_S": f"{params.heartbeat_s:g}",
        # The session keeps 200 messages a conversation by default: a 500-event resume needs more,
        # or it would (rightly) get `resync`.
        "KEFU_MAX_HISTORY_MESSAGES": str(max(1000, 2 * max(params.resume_events) + 50)),
        # Info lines per frame would measure the logger; warnings still show up (and are reported).
        "KEFU_LOG_LEVEL": "WARNING",
    }
    if params.send_queue is not None:
        env["KEFU_WS_SEND_QUEUE"] = str(params.send_queue)
    for attempt in range(1, attempts + 1):
        stack = Stack(StackConfig(data_dir=work_dir, jwt_secret=secret, ports=StackPorts.free(), env=env,
                                  log_dir=work_dir / "logs"))
        try:
            stack.start()
            stack.start_edge("gateway-b", free_port())
            return stack
        except (RuntimeError, TimeoutError):
            stack.stop()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def read_json_line(process: subprocess.Popen[bytes], timeout_s: float, what: str) -> dict[str, Any]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"{what}: no answer within {timeout_s:g} s")
    line = process.stdout.readline().decode()
    if not line:
        raise RuntimeError(f"{what}: the process exited with code {process.wait()}")
    record: dict[str, Any] = json.loads(line)
    return record


def start_floor(heartbeat_s: float, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "bench.ws_floor", "--heartbeat-s", f"{heartbeat_s:g}"],
                                   cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log_file, start_new_session=True)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 20)
    if not ready:
        stop_process(process)
        raise TimeoutError("the floor server printed no address")
    return process, process.stdout.readline().decode().split()[-1]


def tell(processes: Sequence[subprocess.Popen[bytes]], line: str) -> None:
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(line.encode() + b"\n")
        process.stdin.flush()


# ---------------------------------------------------------------- phase 1: idle sockets


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


# ---------------------------------------------------------------- WebSocket helpers


STORED = frozenset({"msg", "state", "note"})
RESUME_CASES = ("cold", "warm", "direct")


async def recv_frame(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout_s)
    if message.type is not aiohttp.WSMsgType.TEXT:
        raise ConnectionError(f"socket closed ({message.type.name}, code {ws.close_code}): {message.data!r}")
    frame: dict[str, Any] = json.loads(message.data)
    return frame


async def hello(ws: aiohttp.ClientWebSocketResponse, token: str, **fields: Any) -> dict[str, Any]:
    await ws.send_str(json.dumps({"type": "hello", "token": token, **fields}))
    welcome = await recv_frame(ws)
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome}")
    return welcome


async def until_pong(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Ask `ping` and collect every frame before the `pong`: frames are handled in order, so a
    turn started by an earlier `send` has ended (its answer stored) when the pong comes."""
    await ws.send_str('{"type": "ping"}')
    frames: list[dict[str, Any]] = []
    while (frame := await recv_frame(ws))["type"] != "pong":
        frames.append(frame)
    return frames


def visitor_token(secret: str, sub: str) -> str:
    return mint(secret, tenant=TENANT, subject=sub, role="visitor", ttl_s=6 * 3600)


def agent_token(secret: str, sub: str) -> str:
    return mint(secret, tenant=TENANT, subject=sub, role="agent", ttl_s=6 * 3600)


def summary_ms(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values), "mean": statistics.fmean(values)}


# ---------------------------------------------------------------- phase 2: resume


@dataclass
class Missed:
    conversation_id: str
    after_seq: int
    last_seq: int
    events: int
    sends: int


async def produce(http: aiohttp.ClientSession, url: str, token: str, events: int) -> Missed:
    """A conversation, then at least `events` more stored events in it, sent on one socket."""
    async with http.ws_connect(url) as ws:
        await hello(ws, token)
        await ws.send_str(json.dumps({"type": "send", "cid": "first", "text": QUESTION}))
        frames = await until_pong(ws)
        stored = [f for f in frames if f["type"] in STORED]
        if not stored:
            raise RuntimeError(f"the first send stored nothing: {frames[:5]}")
        conversation_id, after_seq = stored[0]["conversation_id"], max(f["seq"] for f in stored)
        count, sends, last_seq = 0, 0, after_seq
        while count < events:
            sends += 1
            await ws.send_str(json.dumps({"type": "send", "cid": f"m-{sends}", "conversation_id": conversation_id,
                                          "text": f"{QUESTION} #{sends}"}))
            for frame in await until_pong(ws):
                if frame["type"] in ("nack", "error"):
                    raise RuntimeError(f"producing events: {frame}")
                if frame["type"] in STORED and frame["seq"] > last_seq:
                    count += 1
                    last_seq = frame["seq"]
        return Missed(conversation_id, after_seq, last_seq, count, sends)


async def timed_resume(http: aiohttp.ClientSession, url: str, token: str, missed: Missed) -> float:
    """Seconds from sending hello{resume} to the last missed event; checks none is missing or twice."""
    async with http.ws_connect(url) as ws:
        started = time.perf_counter()
        await ws.send_str(json.dumps({"type": "hello", "token": token, "resume": [
            {"conversation_id": missed.conversation_id, "after_seq": missed.after_seq}]}))
        seqs: list[int] = []
        while True:
            frame = await recv_frame(ws)
            if frame["type"] == "welcome":
                if frame["resume"] != [{"conversation_id": missed.conversation_id, "result": "ok"}]:
                    raise RuntimeError(f"resume refused: {frame}")
            elif frame["type"] in STORED and frame["seq"] > missed.after_seq:
                seqs.append(frame["seq"])
                if frame["seq"] >= missed.last_seq:
                    break
            elif frame["type"] in ("resync", "error", "nack"):
                raise RuntimeError(f"resume failed: {frame}")
        elapsed = time.perf_counter() - started
    if len(seqs) != missed.events or seqs != sorted(set(seqs)):
        raise RuntimeError(f"resume replayed {len(seqs)} events (want {missed.events}), in order: "
                           f"{seqs == sorted(seqs)}")
    return elapsed


async def direct_read(session_addr: str, token: str, sub: str, missed: Missed) -> float:
    """The direct path: one ListMessages call to the session service (all kept messages)."""
    async with internal_channel(session_addr, token) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        request = session_pb2.ListMessagesRequest(
            principal=session_pb2.Principal(tenant=TENANT, subject=sub, role="visitor"),
            session_id=missed.conversation_id)
        await stub.ListMessages(request, timeout=10)  # the channel connects outside the timing
        started = time.perf_counter()
        reply = await stub.ListMessages(request, timeout=10)
        elapsed = time.perf_counter() - started
    got = sum(1 for m in reply.messages if m.seq > missed.after_seq)
    if got < missed.events:
        log.warning("ListMessages returned %d of the %d missed events", got, missed.events)
    return elapsed


async def resume_phase(params: WsBenchParams, stack: Stack, secret: str) -> dict[str, Any]:
    url = f"{stack.base_url}/v1/ws"
    session_addr = f"127.0.0.1:{stack.config.ports.session}"
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for events in params.resume_events:
            sub = f"resume-{events}-{secrets.token_hex(3)}"
            token = visitor_token(secret, sub)
            started = time.perf_counter()
            missed = await produce(http, url, token, events)
            log.info("resume %d: %d stored events from %d sends in %.1f s", events, missed.events, missed.sends,
                     time.perf_counter() - started)
            row: dict[str, Any] = {"events": missed.events, "sends": missed.sends}
            await asyncio.sleep(0.5)  # the producer's feed on the edge is gone: the first case is cold
            for case in RESUME_CASES:
                try:
                    times = await resume_case(case, params.resume_rounds, http, url, token, missed, session_addr,
                                              stack.config.internal_token, sub)
                except (RuntimeError, ConnectionError, TimeoutError, aiohttp.ClientError, grpc.RpcError) as error:
                    log.error("resume %d %s failed: %s", events, case, error)
                    row[f"{case}_error"] = f"{type(error).__name__}: {error}"
                    continue
                row[f"{case}_ms"] = [t * 1000 for t in times]
                row[f"{case}_median_ms"] = statistics.median(times) * 1000
            results[str(events)] = row
    return results


async def resume_case(case: str, rounds: int, http: aiohttp.ClientSession, url: str, token: str, missed: Missed,
                      session_addr: str, internal_token: str, sub: str) -> list[float]:
    if case == "direct":
        return [await direct_read(session_addr, internal_token, sub, missed) for _ in range(rounds)]
    if case == "cold":
        times = []
        for _ in range(rounds):
            times.append(await timed_resume(http, url, token, missed))
            await asyncio.sleep(0.3)  # its feed closes with the socket: the next one is cold again
        return times
    # warm: another tab keeps the conversation's feed open on this edge meanwhile (and reads its frames).
    async with http.ws_connect(url) as tab:
        await hello(tab, token, resume=[{"conversation_id": missed.conversation_id, "after_seq": missed.last_seq}])
        drain = asyncio.create_task(_drain(tab))
        try:
            return [await timed_resume(http, url, token, missed) for _ in range(rounds)]
        finally:
            drain.cancel()


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


# ---------------------------------------------------------------- phase 3: visitor -> agent latency


@dataclass
class LatencyRun:
    sent: dict[int, float] = field(default_factory=dict)
    received: dict[int, float] = field(default_factory=dict)
    echoed: dict[int, float] = field(default_factory=dict)
    """When the sender's own socket got the stored `msg` back (the same edge: splits the path)."""
    acked: dict[int, float] = field(default_factory=dict)
    duplicates: int = 0
    ai_frames: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    lag: list[float] = field(default_factory=list)
    pending: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    """Claims awaiting their ack or nack, by cid (the agents' readers resolve them)."""


async def open_visitor(http: aiohttp.ClientSession, url: str, mode: str, secret: str,
                       number: int) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    ws = await http.ws_connect(url)
    if mode == "floor":
        conversation_id = f"room-{number}"
        await ws.send_str(json.dumps({"type": "hello", "conversation_id": conversation_id}))
        await recv_frame(ws)
        return ws, conversation_id
    await hello(ws, visitor_token(secret, f"latency-{number}-{secrets.token_hex(3)}"))
    await ws.send_str(json.dumps({"type": "send", "cid": "start", "text": QUESTION}))
    frames = await until_pong(ws)
    conversation_id = next(f["conversation_id"] for f in frames if f["type"] in STORED)
    # To the queue, so that an agent may claim it (the AI stays silent from then on).
    await ws.send_str(json.dumps({"type": "handoff", "conversation_id": conversation_id, "cid": "handoff"}))
    for frame in await until_pong(ws):
        if frame["type"] == "nack":
            log.warning("handoff refused: %s", frame)
    return ws, conversation_id


async def claim(ws: aiohttp.ClientWebSocketResponse, run: LatencyRun, conversation_id: str, cid: str) -> str | None:
    """Claim a conversation; None when acknowledged, else what went wrong. The agent's reader,
    already running, hands over the answer: nobody's frames wait unread meanwhile."""
    answer = run.pending[cid] = asyncio.get_running_loop().create_future()
    await ws.send_str(json.dumps({"type": "claim", "conversation_id": conversation_id, "cid": cid}))
    try:
        frame = await asyncio.wait_for(answer, FRAME_TIMEOUT_S)
    except TimeoutError:
        return "no answer"
    finally:
        run.pending.pop(cid, None)
    return None if frame["type"] == "ack" else f"{frame.get('code')}: {frame.get('message')}"


async def read_counting_failures(reader: Callable[[aiohttp.ClientWebSocketResponse, LatencyRun], Awaitable[None]],
                                 ws: aiohttp.ClientWebSocketResponse, run: LatencyRun, who: str) -> None:
    """Run one socket's reader; a socket that fails is counted among the problems, not raised."""
    try:
        await reader(ws, run)
    except (aiohttp.ClientError, ConnectionError) as error:
        run.problems[f"{who} socket: {type(error).__name__}"] += 1


async def _read_visitor(ws: aiohttp.ClientWebSocketResponse, run: LatencyRun) -> None:
    async for message in ws:
        if message.type is not aiohttp.WSMsgType.TEXT:
            break
        now = time.perf_counter()
        frame = json.loads(message.data)
        kind = frame["type"]
        if kind == "msg" and frame["sender"]["type"] == "visitor" and frame["text"].startswith("bench-"):
            run.echoed.setdefault(int(frame["text"].split(" ", 1)[0].removeprefix("bench-")), now)
        elif kind == "ack" and str(frame.get("cid", "")).startswith("b-"):
            run.acked.setdefault(int(frame["cid"].removeprefix("b-")), now)
        elif kind == "ai_delta" or kind == "msg" and frame["sender"]["type"] == "ai":
            run.ai_frames += 1
        elif kind in ("nack", "error"):
            run.problems[f"visitor {kind} {frame.get('code')}: {frame.get('message')}"] += 1
    if ws.close_code not in (None, 1000):
        run.problems[f"visitor socket closed {ws.close_code}"] += 1


async def _read_agent(ws: aiohttp.ClientWebSocketResponse, run: LatencyRun) -> None:
    async for message in ws:
        if message.type is not aiohttp.WSMsgType.TEXT:
            break
        now = time.perf_counter()
        frame = json.loads(message.data)
        if frame["type"] in ("ack", "nack") and frame.get("cid") in run.pending:
            run.pending[frame["cid"]].set_result(frame)
        elif frame["type"] == "msg" and frame["sender"]["type"] == "visitor" and frame["text"].startswith("bench-"):
            number = int(frame["text"].split(" ", 1)[0].removeprefix("bench-"))
            if number in run.received:
                run.duplicates += 1
            else:
                run.received[number] = now
        elif frame["type"] in ("nack", "error"):
            run.problems[f"agent {frame['type']} {frame.get('code')}: {frame.get('message')}"] += 1
    if ws.close_code not in (None, 1000):
        run.problems[f"agent socket closed {ws.close_code}"] += 1


async def latency_run(params: WsBenchParams, mode: str, visitor_url: str, agent_url: str, secret: str,
                      pids: dict[str, int]) -> dict[str, Any]:
    run = LatencyRun()
    run_id = secrets.token_hex(3)  # fresh agents each run: an agent's sockets follow every conversation it holds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        gate = asyncio.Semaphore(20)

        readers: list[asyncio.Task[None]] = []

        async def one_visitor(number: int) -> tuple[aiohttp.ClientWebSocketResponse, str]:
            async with gate:
                ws, conversation_id = await open_visitor(http, visitor_url, mode, secret, number)
            # Read from now on: queue positions and state changes keep coming while others set up,
            # and a socket left unread is (rightly) closed as too slow.
            readers.append(asyncio.create_task(read_counting_failures(_read_visitor, ws, run, "visitor")))
            return ws, conversation_id

        visitors = await asyncio.gather(*(one_visitor(n) for n in range(params.visitors)))
        agents = []
        for number in range(params.agents):
            ws = await http.ws_connect(agent_url)
            if mode == "kefu":
                await hello(ws, agent_token(secret, f"bench-agent-{number}-{run_id}"))
            else:
                await ws.send_str('{"type": "hello"}')
                await recv_frame(ws)
            agents.append(ws)
            readers.append(asyncio.create_task(read_counting_failures(_read_agent, ws, run, "agent")))
        claim_failures: Counter[str] = Counter(filter(None, await asyncio.gather(*(
            claim(agents[number % len(agents)], run, conversation_id, f"claim-{number}")
            for number, (_, conversation_id) in enumerate(visitors)))))
        if claim_failures:
            log.warning("%s: claims refused: %s", mode, dict(claim_failures))
        total = int((params.warmup_s + params.duration_s) * params.rate)
        warmup = int(params.warmup_s * params.rate)
        pids = {**pids, "client": os.getpid()}
        # The CPU the set-up conversations cost with nothing sent (heartbeats, timers, idle feeds):
        # what per-message figures include besides the messages themselves.
        idle_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        await asyncio.sleep(IDLE_WINDOW_S)
        idle_cpu = {name: round(((cpu_seconds(pid) or 0.0) - before) * 100 / IDLE_WINDOW_S)
                    for name, pid in pids.items() if (before := idle_before[name]) is not None}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        busy_before = machine_busy_seconds()
        # Open loop: each message leaves on its own schedule, however long earlier ones take to arrive.
        offsets = arrival_offsets(params.rate, count=total)
        started = time.perf_counter()
        for number in range(total):
            due = started + offsets[number]
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            ws, conversation_id = visitors[number % len(visitors)]
            now = time.perf_counter()
            run.lag.append((now - due) * 1000)
            if ws.closed:
                run.problems["send on a socket the server had closed"] += 1
                continue
            run.sent[number] = now
            frame = {"type": "send", "cid": f"b-{number}", "conversation_id": conversation_id,
                     "text": f"bench-{number} 您好，请问我的订单到哪了？"}
            try:
                await ws.send_str(json.dumps(frame, ensure_ascii=False))
            except (aiohttp.ClientError, ConnectionError):
                run.problems["send on a socket the server had closed"] += 1
        sending_s = time.perf_counter() - started
        # Wait for what is still queued, as long as it keeps arriving (a backlog drains at the
        # delivered rate); give up after QUIET_S without progress.
        progress, quiet_since = len(run.received), time.monotonic()
        while len(run.received) < total and time.monotonic() - quiet_since < QUIET_S:
            await asyncio.sleep(0.05)
            if len(run.received) > progress:
                progress, quiet_since = len(run.received), time.monotonic()
        steady_s = time.perf_counter() - started
        cpu = {name: (cpu_seconds(pid) or 0.0) - before for name, pid in pids.items()
               if (before := cpu_before[name]) is not None}
        busy_after = machine_busy_seconds()
        if busy_before is not None and busy_after is not None:
            # What the rest of the machine (other work on a shared box) took meanwhile.
            cpu["others"] = max(0.0, busy_after - busy_before - sum(cpu.values()))
        delivered = len(run.received)
        # Arrivals from here on (frames flushed before the close frames) are not counted.
        counted = dict(run.received)
        for ws in [*(v for v, _ in visitors), *agents]:
            await ws.close()
        await asyncio.gather(*readers, return_exceptions=True)
        run.received = counted
    measured = [(run.received[n] - run.sent[n]) * 1000 for n in range(warmup, total) if n in run.received]
    # Median latency per second of sending (warm-up included): a queue that grows, drains or stays.
    by_second: dict[int, list[float]] = {}
    for n, sent in run.sent.items():
        if n in run.received:
            by_second.setdefault(int(n / params.rate), []).append((run.received[n] - sent) * 1000)
    timeline = [round(statistics.median(by_second[second]), 1) for second in sorted(by_second)]
    echo = [(run.echoed[n] - run.sent[n]) * 1000 for n in range(warmup, total) if n in run.echoed and n in run.sent]
    ack = [(run.acked[n] - run.sent[n]) * 1000 for n in range(warmup, total) if n in run.acked and n in run.sent]
    return {
        "mode": mode, "offered_rate": params.rate, "messages": total - warmup, "warmup_messages": warmup,
        "received": len(measured), "lost": (total - warmup) - len(measured), "duplicates": run.duplicates,
        "achieved_rate": total / sending_s if sending_s else None,
        "delivered_rate": _delivered_rate(run),
        "latency_ms": summary_ms(measured), "sender_lag_ms": summary_ms(run.lag[warmup:]),
        "own_echo_ms": summary_ms(echo), "ack_ms": summary_ms(ack), "median_ms_by_second": timeline,
        "client_cpu_percent": cpu["client"] * 100 / steady_s if "client" in cpu else None,
        "cpu_percent": {name: round(seconds * 100 / steady_s) for name, seconds in cpu.items()},
        "idle_cpu_percent": idle_cpu,
        "cpu_ms_per_message": {name: round(seconds * 1000 / delivered, 3)
                               for name, seconds in cpu.items() if name != "others" and delivered},
        "claims_refused": dict(claim_failures), "ai_frames_to_visitors": run.ai_frames,
        "problems": dict(run.problems),
    }


def _delivered_rate(run: LatencyRun) -> float | None:
    """Messages the agents got per second, from the first send to the last arrival."""
    if len(run.received) < 2 or not run.sent:
        return None
    span = max(run.received.values()) - min(run.sent.values())
    return len(run.received) / span if span > 0 else None


# ---------------------------------------------------------------- report


def _cell(value: float | None, fmt: str = ".1f") -> str:
    return "–" if value is None else format(value, fmt)


def _ratio(kefu: float | None, floor: float | None) -> str:
    return "–" if not kefu or not floor else f"{kefu / floor:.1f}×"


def _per_connect(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "–" if value is None or not row["opened"] else f"{value * 1000 / row['opened']:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    p, machine = report["parameters"], report["machine"]
    lines = [f"# kefu live-chat bench, {report['timestamp']}", "",
             f"{machine['cpu_count']} CPUs, Python {machine['python']}, load average "
             f"{machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end, "
             f"{machine['seconds']} s. Command: `{report['command']}`."]
    idle = report.get("idle")
    if idle:
        k, f = idle["kefu"], idle.get("floor") or {}
        lines += ["", "## Idle sockets on one edge process", "",
                  f"{p['client_processes']} client process(es), {p['connect_parallel']} handshakes in flight each; "
                  f"a socket counts once `welcome` arrived. Held {p['hold_s']:g} s with a server ping every "
                  f"{p['heartbeat_s']:g} s. KiB/socket = (VmRSS − VmRSS before) / sockets; `held` is after the hold.",
                  f"CPU ms/connect: CPU time spent while opening / sockets opened, by the server and by all "
                  f"client processes together; their sum against {machine['cpu_count']} cores × wall time says "
                  f"who was short of CPU.",
                  "", "| server | sockets | failed | open after hold | connect/s | handshake p50 / p99 ms "
                  "| CPU ms/connect server / clients | RSS before → held MiB | KiB/socket opened | KiB/socket held "
                  "| CPU % holding |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in (("kefu edge", k), ("aiohttp floor", f)):
            if not row:
                continue
            hs = row["connect_ms"] or {}
            lines.append(
                f"| {name} | {row['opened']} | {row['failed']} | {row['still_open_after_hold']} | "
                f"{_cell(row['connect_rate'], '.0f')} | {_cell(hs.get('p50'))} / {_cell(hs.get('p99'))} | "
                f"{_per_connect(row, 'cpu_seconds_opening')} / {_per_connect(row, 'client_cpu_seconds_opening')} | "
                f"{_cell(row['rss_mib']['before'])} → {_cell(row['rss_mib']['held'])} | "
                f"{_cell(row['kib_per_socket']['opened'])} | {_cell(row['kib_per_socket']['held'])} | "
                f"{_cell(row['cpu_percent_holding'], '.0f')} |")
        if f:
            lines.append(f"| kefu / floor | | | | {_ratio(k['connect_rate'], f['connect_rate'])} | | | | "
                         f"{_ratio(k['kib_per_socket']['opened'], f['kib_per_socket']['opened'])} | "
                         f"{_ratio(k['kib_per_socket']['held'], f['kib_per_socket']['held'])} | |")
        for row in (k, f):
            if row and row.get("capped"):
                lines += ["", f"Capped: {row['capped']}"]
            if row and row.get("errors"):
                lines += ["", f"Errors ({row['mode']}): {json.dumps(row['errors'], ensure_ascii=False)}"]
        for row in (k, f):
            if row and row["still_open_after_hold"] < row["opened"]:
                lines += ["", f"{row['mode']}: {row['opened'] - row['still_open_after_hold']} sockets were closed by "
                              f"the server before the end of the hold (close codes seen by the clients: "
                              f"{json.dumps(row['close_codes'])}); KiB/socket still divides by all opened."]
        held = k["kib_per_socket"]["held"]
        verdict = "met" if held is not None and held <= 32 and k["opened"] >= 10_000 else "NOT met"
        lines += ["", f"Target ≤ 32 KiB per idle socket at 10,000 sockets: **{verdict}** "
                      f"({_cell(held)} KiB at {k['opened']} sockets)."]
    resume = report.get("resume")
    if resume:
        lines += ["", "## Resume", "",
                  f"Median of {p['resume_rounds']} rounds, ms from sending `hello {{resume}}` on a connected "
                  f"socket to the last missed event. cold: no other socket of the conversation on the edge; warm: "
                  f"another tab keeps its feed open; direct: one ListMessages call to the session service (what a "
                  f"cold feed reads before it follows the conversation's log). KEFU_WS_SEND_QUEUE: "
                  f"{p['send_queue'] if p['send_queue'] is not None else 'the edge default'}.", "",
                  "| missed events | sends | cold | warm | direct | cold / direct | cold min–max |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        failures = []
        for row in resume.values():
            if "events" not in row:
                continue
            cold = row.get("cold_ms") or []
            lines.append(f"| {row['events']} | {row['sends']} | {_cell(row.get('cold_median_ms'))} | "
                         f"{_cell(row.get('warm_median_ms'))} | {_cell(row.get('direct_median_ms'))} | "
                         f"{_ratio(row.get('cold_median_ms'), row.get('direct_median_ms'))} | "
                         + (f"{min(cold):.1f}–{max(cold):.1f} |" if cold else "– |"))
            failures += [f"- {row['events']} events, {case}: {row[f'{case}_error']}"
                         for case in RESUME_CASES if f"{case}_error" in row]
        if failures:
            lines += ["", "Failed:", "", *failures]
        if "error" in resume:
            lines += ["", f"Resume phase failed: {resume['error']}"]
        biggest = resume.get("500")
        if biggest:
            medians = [biggest.get(f"{case}_median_ms") for case in ("cold", "warm")]
            ok = all(m is not None and m < 100 for m in medians)
            lines += ["", f"Target 500 missed events < 100 ms: **{'met' if ok else 'NOT met'}** "
                          f"(cold {_cell(medians[0])} ms, warm {_cell(medians[1])} ms)."]
    latency = report.get("latency")
    if latency:
        lines += ["", "## Visitor → agent latency", "",
                  f"{p['visitors']} visitors on one edge, {p['agents']} agents on another edge process; "
                  f"{p['rate']:g} messages/s in total, open loop, {p['duration_s']:g} s measured after "
                  f"{p['warmup_s']:g} s warm-up. Send → agent receives the stored `msg`, ms. The floor relays "
                  f"the same frames inside one plain aiohttp process.", "",
                  "| path | messages | lost | dup | sent/s | delivered/s | p50 | p90 | p99 | max | sender lag p99 "
                  "| client CPU % |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ("kefu", "floor"):
            row = latency.get(name)
            if not row or "error" in row:
                continue
            ms, lag = row["latency_ms"] or {}, row["sender_lag_ms"] or {}
            lines.append(f"| {name} | {row['messages']} | {row['lost']} | {row['duplicates']} | "
                         f"{_cell(row['achieved_rate'], '.0f')} | {_cell(row.get('delivered_rate'), '.0f')} | "
                         f"{_cell(ms.get('p50'))} | {_cell(ms.get('p90'))} | "
                         f"{_cell(ms.get('p99'))} | {_cell(ms.get('max'))} | {_cell(lag.get('p99'))} | "
                         f"{_cell(row['client_cpu_percent'], '.0f')} |")
        failed = {name: row["error"] for name, row in latency.items() if "error" in row}
        kefu_row, floor_row = (None if n in failed else latency.get(n) for n in ("kefu", "floor"))
        if kefu_row and floor_row and kefu_row["latency_ms"] and floor_row["latency_ms"]:
            k_ms, f_ms = kefu_row["latency_ms"], floor_row["latency_ms"]
            lines.append(f"| kefu / floor | | | | | | {_ratio(k_ms['p50'], f_ms['p50'])} | | "
                         f"{_ratio(k_ms['p99'], f_ms['p99'])} | | | |")
        if kefu_row:
            for key, what in (("own_echo_ms", "the sender's own socket gets its stored `msg`"),
                              ("ack_ms", "the sender gets its `ack`")):
                if kefu_row.get(key):
                    lines += ["", f"Same run, send → {what}: p50 {kefu_row[key]['p50']:.1f} ms, "
                                  f"p99 {kefu_row[key]['p99']:.1f} ms."]
            if kefu_row.get("median_ms_by_second"):
                lines += ["", "Median latency per second of sending (warm-up first), ms: "
                              + ", ".join(f"{v:g}" for v in kefu_row["median_ms_by_second"]) + "."]
            if kefu_row.get("cpu_percent"):
                per_message = kefu_row["cpu_ms_per_message"]
                kefu_total = sum(v for n, v in per_message.items() if n != "client")
                lines += ["", "CPU from the first send to the last arrival, % of one core (`others`: the rest of "
                              f"the machine, of {machine['cpu_count'] * 100} %): "
                              + ", ".join(f"{n} {v}" for n, v in kefu_row["cpu_percent"].items()) + "; CPU ms per "
                              "delivered message: "
                              + ", ".join(f"{n} {v:g}" for n, v in per_message.items())
                              + f" (kefu total {kefu_total:.2f}). With nothing sent, the same set-up used: "
                              + ", ".join(f"{n} {v}" for n, v in kefu_row.get("idle_cpu_percent", {}).items())
                              + " (% of one core)."]
            for key in ("claims_refused", "problems"):
                if kefu_row[key]:
                    lines += ["", f"kefu {key.replace('_', ' ')}: {json.dumps(kefu_row[key], ensure_ascii=False)}"]
            if kefu_row["ai_frames_to_visitors"]:
                lines += ["", f"AI frames reached visitors during the run: {kefu_row['ai_frames_to_visitors']} "
                              "(the conversations were not all with an agent)."]
            p99 = (kefu_row["latency_ms"] or {}).get("p99")
            ok = p99 is not None and p99 <= 50 and p["rate"] >= 500 and not kefu_row["lost"]
            lines += ["", f"Target p99 ≤ 50 ms at 500 messages/s: **{'met' if ok else 'NOT met'}** "
                          f"(p99 {_cell(p99)} ms at {p['rate']:g}/s, {kefu_row['lost']} lost)."]
            lines += shape_floor_lines(latency, kefu_row, machine["cpu_count"], p["rate"])
        lines += sweep_lines(latency)
        lines += [f"\nLatency ({name}) failed: {error}" for name, error in failed.items()]
        if "kefu" in failed:
            lines += ["", "Target p99 ≤ 50 ms at 500 messages/s: **not measured**."]
    problems = report.get("problems_in_logs")
    if problems:
        lines += ["", "Warnings and errors in the process logs:", ""]
        for name, entries in problems.items():
            lines += [f"- {name}:"] + [f"  - `{e}`" for e in entries]
    return "\n".join(lines) + "\n"


P99_LIMIT_MS = 50.0
"""A rate passes while visitor-to-agent p99 stays at most this, with nothing lost."""


def rate_rows(latency: dict[str, Any]) -> dict[float, dict[str, Any]]:
    """kefu's run at each swept rate and at the main rate, by offered rate."""
    rows = {float(r): row for r, row in (latency.get("sweep") or {}).items()}
    kefu_row = latency.get("kefu")
    if kefu_row and "error" not in kefu_row and kefu_row.get("offered_rate") is not None:
        rows[float(kefu_row["offered_rate"])] = kefu_row
    return dict(sorted(rows.items()))


def passes(row: dict[str, Any]) -> bool:
    p99 = (row.get("latency_ms") or {}).get("p99")
    return "error" not in row and p99 is not None and p99 <= P99_LIMIT_MS and not row["lost"]


def highest_rate_within(latency: dict[str, Any]) -> float | None:
    """The highest rate whose p99 stays within the limit with every lower measured rate within too."""
    return highest_within({rate: passes(row) for rate, row in rate_rows(latency).items()})


def sweep_lines(latency: dict[str, Any]) -> list[str]:
    """kefu at each swept rate (and the main one): CPU per live message per process, and how much it
    carries with p99 within 50 ms."""
    rows = rate_rows(latency)
    if len(rows) < 2:
        return []
    names = sorted({n for row in rows.values() if "error" not in row for n in row["cpu_ms_per_message"]},
                   key=lambda n: (n == "client", n))
    lines = ["", "kefu at each rate (same stack, fresh visitors and agents each time; `CPU %`: every kefu process "
                 "and nats-server, % of one core; then CPU ms per delivered message per process, `kefu` their sum "
                 "without the bench's client):", "",
             "| offered/s | delivered/s | lost | p50 ms | p99 ms | CPU % | " + " | ".join(names) + " | kefu |",
             "|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(names) + 1)]
    for offered, row in rows.items():
        if "error" in row:
            lines.append(f"| {offered:g} | failed: {row['error']} |" + " |" * (len(names) + 5))
            continue
        ms, per = row["latency_ms"] or {}, row["cpu_ms_per_message"]
        cpu = sum(v for n, v in row["cpu_percent"].items() if n not in ("client", "others"))
        kefu = sum(v for n, v in per.items() if n != "client")
        lines.append(f"| {offered:g} | {_cell(row.get('delivered_rate'), '.0f')} | {row['lost']} | "
                     f"{_cell(ms.get('p50'))} | {_cell(ms.get('p99'))} | {cpu} | "
                     + " | ".join(_cell(per.get(n), ".2f") for n in names) + f" | {kefu:.2f} |")
    best = highest_rate_within(latency)
    lines += ["", f"Highest rate with visitor → agent p99 ≤ {P99_LIMIT_MS:g} ms and nothing lost (every lower rate "
                  f"measured within too): **{f'{best:g} messages/s' if best is not None else 'none'}**."]
    return lines


def shape_floor_lines(latency: dict[str, Any], kefu_row: dict[str, Any], cpu_count: int,
                      rate: float) -> list[str]:
    """What the fixed shape costs per message before any of kefu's own work, from parts measured in this run."""
    grpc_row, floor_row = latency.get("grpc_floor"), latency.get("floor")
    if not grpc_row or "error" in grpc_row:
        return []
    grpc_ms = sum(grpc_row["cpu_ms_per_message"].values())
    parts = {"two empty unary gRPC calls (client and both servers)": grpc_ms,
             "nats-server (in the kefu run)": kefu_row["cpu_ms_per_message"].get("nats", 0.0),
             "the bench's client (in the kefu run)": kefu_row["cpu_ms_per_message"].get("client", 0.0)}
    if floor_row and "error" not in floor_row:
        parts["relaying the frames (the plain aiohttp floor)"] = floor_row["cpu_ms_per_message"].get("floor", 0.0)
    total = sum(parts.values())
    return ["", f"The shape's own share, same run (bench/grpc_floor.py: two calls of an empty method with kefu's "
                f"server and channel options, one after the other, {rate:g} messages/s; p99 "
                f"{grpc_row['latency_ms']['p99']:.1f} ms): CPU ms per message: "
                + ", ".join(f"{name} {value:.2f}" for name, value in parts.items())
                + f"; {total:.2f} ms in all, which at 500 messages/s is {total * 500 / 1000:.2f} of this machine's "
                  f"{cpu_count} cores before any of kefu's own work."]


# ---------------------------------------------------------------- main


def guarded(phase: Callable[[], dict[str, Any]], name: str) -> dict[str, Any]:
    """A phase's figures, or what broke it: the other phases still run and the report is written."""
    try:
        return phase()
    except (RuntimeError, ConnectionError, TimeoutError, aiohttp.ClientError, grpc.RpcError, KeyError) as error:
        log.exception("%s failed", name)
        return {"error": f"{type(error).__name__}: {error}"}


def run(params: WsBenchParams, work_dir: Path, command: str) -> dict[str, Any]:
    started, loadavg_start = datetime.now(UTC), os.getloadavg()
    soft, _ = raise_open_files_limit()
    secret = secrets.token_hex(32)
    report: dict[str, Any] = {"timestamp": started.strftime("%Y%m%dT%H%M%SZ"), "parameters": asdict(params),
                              "command": command}
    floor: subprocess.Popen[bytes] | None = None
    stack: Stack | None = None
    try:
        if params.floor:
            floor, floor_url = start_floor(params.heartbeat_s, work_dir / "floor.log")
        log.info("starting kefu (logs in %s)", work_dir / "logs")
        stack = start_ws_stack(work_dir, secret, params)
        edge_a = stack.processes["gateway"]
        edge_b_url = f"http://127.0.0.1:{stack.edges['gateway-b']}"
        if "idle" in params.phases:
            log.info("idle: %d sockets on the edge (pid %d)", params.sockets, edge_a.pid)
            report["idle"] = {"kefu": idle_phase(params, f"{stack.base_url}/v1/ws", edge_a.pid, "kefu", secret)}
            if floor is not None:
                log.info("idle: %d sockets on the floor", params.sockets)
                report["idle"]["floor"] = idle_phase(params, f"{floor_url}/ws", floor.pid, "floor", secret)
        if "resume" in params.phases:
            log.info("resume: %s missed events", params.resume_events)
            report["resume"] = guarded(lambda: asyncio.run(resume_phase(params, stack, secret)), "resume")
        if "latency" in params.phases:
            pids = {name: p.pid for name, p in stack.processes.items()}
            if stack.nats is not None:
                pids["nats"] = stack.nats.process.pid
            # The lower rates first: a rate kefu cannot carry leaves a backlog that would weigh on the next run.
            sweep: dict[str, Any] = {}
            for rate in sorted(r for r in params.sweep if r != params.rate):
                log.info("latency sweep: %g messages/s", rate)
                def at_rate(rate: float = rate) -> dict[str, Any]:
                    return asyncio.run(latency_run(replace(params, rate=rate), "kefu", f"{stack.base_url}/v1/ws",
                                                   f"{edge_b_url}/v1/ws", secret, pids))

                sweep[f"{rate:g}"] = guarded(at_rate, f"latency sweep {rate:g}/s")
            log.info("latency: %g messages/s for %g s", params.rate, params.duration_s)
            report["latency"] = {"kefu": guarded(lambda: asyncio.run(latency_run(
                params, "kefu", f"{stack.base_url}/v1/ws", f"{edge_b_url}/v1/ws", secret, pids)), "latency (kefu)")}
            if sweep:
                report["latency"]["sweep"] = sweep
            # Beside `latency`, whose values are all runs.
            report["latency_highest_rate_within"] = highest_rate_within(report["latency"])
            if floor is not None:
                report["latency"]["floor"] = guarded(lambda: asyncio.run(latency_run(
                    params, "floor", f"{floor_url}/ws", f"{floor_url}/ws", secret, {"floor": floor.pid})),
                    "latency (floor)")
            log.info("latency: two empty gRPC calls per message at %g/s", params.rate)
            report["latency"]["grpc_floor"] = guarded(
                lambda: grpc_floor.run(params.rate, params.duration_s, params.warmup_s), "gRPC floor")
        report["memory_mib"] = {name: memory_mib(p.pid) for name, p in stack.processes.items()}
    finally:
        if stack is not None:
            stack.stop()
        if floor is not None:
            stop_process(floor)
    report["problems_in_logs"] = log_problems(work_dir / "logs")
    report["machine"] = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                         "platform": platform.platform(), "loadavg_start": loadavg_start,
                         "loadavg_end": os.getloadavg(), "open_files_limit": soft,
                         "seconds": round((datetime.now(UTC) - started).total_seconds())}
    return report


def main(argv: Sequence[str] | None = None) -> None:
    params, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    command = "python -m bench.ws_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    with bench_work_dir("kefu-ws-bench-", args.keep_logs) as work:
        report = run(params, work.path, command.strip())
        failed = bool(report.get("problems_in_logs")) or any(
            "error" in row for row in (report.get("latency") or {}).values()) or "error" in (report.get("resume") or {})
        work.keep = work.keep or failed
    report["markdown"] = render_markdown(report)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"ws-{report['timestamp']}.json"
    _write(json_path, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    print(report["markdown"], end="")
    log.info("wrote %s in %d s", json_path, report["machine"]["seconds"])


if __name__ == "__main__":
    main()
