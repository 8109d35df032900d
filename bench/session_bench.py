"""`python -m bench.session_bench`: the session service at 100k stored sessions.

Starts its own nats-server (file store in a temporary folder), fills it with `--sessions`
sessions of `--messages` messages each (by default with pipelined writes of exactly the
records `SessionStore` writes; `--fill store` goes through `SessionStore.append`), then
measures:

- appends per second and append p50/p99 at `--concurrency`, through the store and through
  the gRPC service (`python -m services.session` as a subprocess on the same nats-server);
- BuildContext p50/p99 one call at a time (latency without queueing) on random sessions,
  through the store (read + context build) and through gRPC, for an empty model (the
  default cl100k, stored counts reused) and for `gpt-4o` (o200k, every message recounted);
- BeginTurn one call at a time through gRPC (issue 20): a new conversation of a new visitor and
  the next turn of an existing one, each with its client-side p50, the server-side mean from the
  service's `kefu_session_operation_duration_seconds{operation="begin_turn"}`, and the CPU time
  per call of the session process and of nats-server (from /proc);
- the resident memory (VmRSS, and the peak VmHWM) of the session process and of nats-server,
  and the size of the JetStream store on disk.

`--begin-turn-only` skips the store, append and BuildContext measurements (the fill stays).

A fill slower than `--max-fill-s` stops early; the figures are then at the size reached.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import random
import re
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from bench.loadgen import percentile
from bench.proc_stats import live_cpu_seconds, memory_kib
from bench.processes import INTERNAL_TOKEN, bench_work_dir, start_service, stop_process
from devtools.devstack.nats_server import NatsServer, start_nats_server
from devtools.devstack.stack import free_port
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.conversation_log import log_subject
from services.common.grpc_client import internal_channel
from services.session.context import build_context
from services.session.models import MetaDelta, Principal, SessionMeta, StoredMessage, new_id
from services.session.store import META_SUBJECT_PREFIX, SessionStore, meta_key
from services.session.tokens import TokenCounter, TokenCounters

log = logging.getLogger("bench.session")

TENANT = "bench"
SYSTEM_PROMPT = "你是网店的客服助手，回答要简短、礼貌，只根据已知信息回答。You are the shop's assistant."
TURNS = [
    ("user", "您好，我的订单号是20240518001，快递三天了还没到，请帮我查一下物流状态，谢谢！"),
    ("assistant", "您好！已为您查询：包裹目前在上海转运中心，预计明天送达。如有其他问题请随时联系我们。"),
    ("user", "Can I return the green tea if the box is already opened? 已经拆封了还能退吗？"),
    ("assistant", "Opened food items can be returned within 7 days if the quality is at fault. 质量问题7天内可退。"),
    ("user", "好的，那退款多久到账？🙂"),
    ("assistant", "退款审核通过后1-3个工作日原路退回，信用卡可能需要更久。"),
]
SERVICE_ENV = {
    # Production's checks all run (visitor rate, open conversations, tenant quota), set never to refuse.
    "KEFU_VISITOR_MSG_RPS": "1000", "KEFU_VISITOR_MSG_BURST": "100000", "KEFU_VISITOR_MAX_CONVERSATIONS": "1000",
}
RETURNING = 100
"""Visitors the returning-visitor measurement speaks as, in turn: each opens conversation after conversation."""
OPERATION_METRIC = "kefu_session_operation_duration_seconds"


@dataclass
class Stats:
    count: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        return {
            "count": self.count,
            "per_s": round(self.count / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(percentile(ordered, 50), 2),
            "p99_ms": round(percentile(ordered, 99), 2),
        }


def dir_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass(frozen=True)
class Session:
    principal: Principal
    session_id: str


async def fill_direct(nc: NatsClient, counter: TokenCounter, sessions: int, messages: int,
                      max_seconds: float) -> tuple[list[Session], float]:
    """Write the same records `SessionStore.append` writes, without its reads and CAS.

    Pipelined JetStream publishes, every one acknowledged (`publish_async`), so 100k sessions
    take seconds; the figures are then measured through the store and the service.
    """
    js = nc.jetstream()
    tokens = [counter.count(text) for _, text in TURNS]
    created: list[Session] = []
    acks: list[asyncio.Future[Any]] = []
    start = time.perf_counter()
    for n in range(sessions):
        if time.perf_counter() - start > max_seconds:
            break
        principal = Principal(TENANT, f"visitor-{n}", "visitor")
        session_id = new_id()
        now = time.time()
        delta = MetaDelta()
        for (role, text), count in list(zip(TURNS, tokens, strict=True))[:messages]:
            message = StoredMessage(new_id(), role, text, now, count, encoding=counter.name)
            delta.add(message)
            acks.append(await js.publish_async(log_subject(TENANT, session_id), message.to_json(),
                                               headers={"Nats-Msg-Id": message.id}))
        meta = SessionMeta(TENANT, principal.subject, now, now).with_delta(delta)
        acks.append(await js.publish_async(f"{META_SUBJECT_PREFIX}.{meta_key(TENANT, session_id)}", meta.to_json()))
        created.append(Session(principal, session_id))
        if len(acks) >= 4096:
            await asyncio.gather(*acks)  # raises on any refused write
            acks.clear()
        if (n + 1) % max(1, sessions // 10) == 0:
            log.info("filled %d sessions in %.0f s", n + 1, time.perf_counter() - start)
    await asyncio.gather(*acks)
    return created, time.perf_counter() - start


async def fill(store: SessionStore, sessions: int, messages: int, concurrency: int,
               max_seconds: float) -> tuple[list[Session], float]:
    """Create `sessions` sessions of `messages` messages each through the store; stop early past `max_seconds`."""
    created: list[Session] = []
    numbers = itertools.count()
    start = time.perf_counter()
    deadline = start + max_seconds
    report_every = max(1, sessions // 10)

    async def worker() -> None:
        while time.perf_counter() < deadline:
            n = next(numbers)
            if n >= sessions:
                return
            principal = Principal(TENANT, f"visitor-{n}", "visitor")
            role, text = TURNS[0]
            session_id = (await store.append(principal, "", role, text)).session_id
            for role, text in TURNS[1:messages]:
                await store.append(principal, session_id, role, text)
            created.append(Session(principal, session_id))
            if len(created) % report_every == 0:
                elapsed = time.perf_counter() - start
                log.info("filled %d sessions in %.0f s (%.0f sessions/s)", len(created), elapsed,
                         len(created) / elapsed)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return created, time.perf_counter() - start


async def closed_loop(operation: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> Stats:
    stats = Stats()
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            await operation()
            stats.latencies_ms.append((time.perf_counter() - began) * 1000)
            stats.count += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stats.seconds = time.perf_counter() - start
    return stats


def to_proto(principal: Principal) -> session_pb2.Principal:
    return session_pb2.Principal(tenant=principal.tenant, subject=principal.subject, role=principal.role)


async def measure_store(store: SessionStore, counters: TokenCounters, sessions: list[Session],
                        args: argparse.Namespace) -> dict[str, Any]:
    pick = random.Random(1).choice

    async def append() -> None:
        s = pick(sessions)
        await store.append(s.principal, s.session_id, "user", "请问还有别的颜色吗？Any other colours?")

    results: dict[str, Any] = {}
    results["append"] = (await closed_loop(append, args.concurrency, args.seconds)).summary()
    for model in ("", "gpt-4o"):
        counter = await counters.for_model(model)

        async def context(counter: TokenCounter = counter) -> None:
            s = pick(sessions)
            _, history = await store.messages(s.principal, s.session_id)
            build_context(history, SYSTEM_PROMPT, 3000, counter)

        results[f"build_context[{model or 'default'}]"] = (await closed_loop(context, 1, args.seconds)).summary()
    return results


def operation_totals(metrics_url: str, operation: str) -> tuple[float, int]:
    """(sum of seconds, count) of one operation in the service's histogram."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    found = {name: float(value) for name, value in re.findall(
        rf'^{OPERATION_METRIC}_(sum|count){{operation="{operation}"}} (\S+)$', text, re.MULTILINE)}
    return found.get("sum", 0.0), int(found.get("count", 0))


@dataclass(frozen=True)
class Watched:
    """What a measurement reads beside its latencies: the service's histogram and two processes' CPU."""

    metrics_url: str
    session_pid: int
    nats_pid: int


async def measured_turns(operation: Callable[[], Awaitable[object]], watched: Watched,
                         seconds: float) -> dict[str, float]:
    """BeginTurn one call at a time: client p50/p99, the server's mean, CPU ms per call of each process."""
    server_before = operation_totals(watched.metrics_url, "begin_turn")
    cpu_before = live_cpu_seconds(watched.session_pid), live_cpu_seconds(watched.nats_pid)
    stats = await closed_loop(operation, 1, seconds)
    cpu_after = live_cpu_seconds(watched.session_pid), live_cpu_seconds(watched.nats_pid)
    server_after = operation_totals(watched.metrics_url, "begin_turn")
    calls = max(1, server_after[1] - server_before[1])
    return {**stats.summary(),
            "server_mean_ms": round((server_after[0] - server_before[0]) / calls * 1000, 3),
            "session_cpu_ms": round((cpu_after[0] - cpu_before[0]) / stats.count * 1000, 3),
            "nats_cpu_ms": round((cpu_after[1] - cpu_before[1]) / stats.count * 1000, 3)}


async def measure_begin_turn(stub: session_pb2_grpc.SessionServiceStub, watched: Watched,
                             args: argparse.Namespace) -> dict[str, Any]:
    """A new conversation of a new visitor (the widget's first message), one of a returning visitor (one of
    RETURNING, as `python -m bench` speaks), then next turns of the conversations begun."""
    visitors = itertools.count()
    begun: list[Session] = []

    async def new(returning: bool = False) -> None:
        n = next(visitors)
        principal = Principal(TENANT, f"returning-{n % RETURNING}" if returning else f"turn-visitor-{n}", "visitor")
        reply = await stub.BeginTurn(session_pb2.BeginTurnRequest(
            principal=to_proto(principal), content=TURNS[0][1], system_prompt=SYSTEM_PROMPT), timeout=10)
        begun.append(Session(principal, reply.stored.session_id))

    async def new_returning() -> None:
        await new(returning=True)

    turns = itertools.count()

    async def existing() -> None:
        s = begun[next(turns) % len(begun)]
        await stub.BeginTurn(session_pb2.BeginTurnRequest(
            principal=to_proto(s.principal), session_id=s.session_id, content=TURNS[2][1],
            system_prompt=SYSTEM_PROMPT), timeout=10)

    for _ in range(20):  # warm-up: first calls of each path, not samples
        await new()
        await existing()
    return {"begin_turn[new]": await measured_turns(new, watched, args.seconds),
            "begin_turn[new, returning]": await measured_turns(new_returning, watched, args.seconds),
            "begin_turn[existing]": await measured_turns(existing, watched, args.seconds)}


async def measure_grpc(port: int, sessions: list[Session], args: argparse.Namespace,
                       watched: Watched) -> dict[str, Any]:
    pick = random.Random(2).choice
    results: dict[str, Any] = {}
    async with internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        results.update(await measure_begin_turn(stub, watched, args))
        if args.begin_turn_only:
            return results

        async def append() -> None:
            s = pick(sessions)
            await stub.Append(session_pb2.AppendRequest(
                principal=to_proto(s.principal), session_id=s.session_id, role="user",
                content="请问还有别的颜色吗？Any other colours?"), timeout=10)

        results["append"] = (await closed_loop(append, args.concurrency, args.seconds)).summary()
        for model in ("", "gpt-4o"):
            async def context(model: str = model) -> None:
                s = pick(sessions)
                await stub.BuildContext(session_pb2.BuildContextRequest(
                    principal=to_proto(s.principal), session_id=s.session_id, system_prompt=SYSTEM_PROMPT,
                    max_tokens=3000, model=model), timeout=10)

            await context()  # the first gpt-4o call loads o200k: not a latency sample
            results[f"build_context[{model or 'default'}]"] = (await closed_loop(context, 1, args.seconds)).summary()
    return results


async def connect(server: NatsServer) -> NatsClient:
    return await nats.connect(server.url, max_reconnect_attempts=3, reconnect_time_wait=0.2, connect_timeout=2)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = start_nats_server(workdir / "nats")
    service: subprocess.Popen[bytes] | None = None
    nc = await connect(server)
    try:
        counters = TokenCounters()
        store = await SessionStore.open(nc, counters.default_counter, max_history=200, max_message_chars=32_000,
                                        ttl_s=7 * 24 * 3600)
        log.info("filling %d sessions x %d messages (%s)", args.sessions, args.messages, args.fill)
        if args.fill == "direct":
            sessions, fill_s = await fill_direct(nc, counters.default_counter, args.sessions, args.messages,
                                                 args.max_fill_s)
        else:
            sessions, fill_s = await fill(store, args.sessions, args.messages, args.fill_concurrency,
                                          args.max_fill_s)
        results: dict[str, Any] = {
            "sessions": len(sessions), "messages_per_session": args.messages,
            "fill": {"mode": args.fill, "seconds": round(fill_s, 1),
                     "sessions_per_s": round(len(sessions) / fill_s, 1),
                     "appends_per_s": round(len(sessions) * args.messages / fill_s, 1),
                     "complete": len(sessions) == args.sessions},
            "concurrency": args.concurrency,
        }
        log.info("filled %d sessions in %.0f s", len(sessions), fill_s)
        results["nats_after_fill_kib"] = memory_kib(server.process.pid)
        if not args.begin_turn_only:
            log.info("measuring through the store")
            results["store"] = await measure_store(store, counters, sessions, args)
        if not args.no_grpc:
            metrics_port = free_port()
            service, port = start_service("session", {"KEFU_NATS_URL": server.url, **SERVICE_ENV,
                                                      "KEFU_SESSION_METRICS_PORT": str(metrics_port)},
                                          workdir / "session.log")
            results["session_process_idle_kib"] = memory_kib(service.pid)
            log.info("measuring through gRPC")
            watched = Watched(f"http://127.0.0.1:{metrics_port}/metrics", service.pid, server.process.pid)
            results["grpc"] = await measure_grpc(port, sessions, args, watched)
            results["session_process_kib"] = memory_kib(service.pid)
        results["nats_kib"] = memory_kib(server.process.pid)
        results["jetstream_store_bytes"] = dir_size_bytes(workdir / "nats" / "jetstream")
        return results
    finally:
        if service is not None:
            stop_process(service)
        await nc.close()
        server.stop()


def report(results: dict[str, Any]) -> str:
    fill = results["fill"]
    lines = [(f"sessions stored: {results['sessions']:,} x {results['messages_per_session']} messages "
              f"({fill['mode']} fill {fill['seconds']} s, {fill['sessions_per_s']:,} sessions/s, "
              f"{fill['appends_per_s']:,} appends/s{'' if fill['complete'] else ', STOPPED EARLY'})")]
    for path in ("store", "grpc"):
        if path not in results:
            continue
        for name, figures in results[path].items():
            rate = f"{figures['per_s']:,} /s, " if name == "append" else ""
            conc = f" (concurrency {results['concurrency']})" if name == "append" else " (one at a time)"
            server = (f", server mean {figures['server_mean_ms']} ms, CPU per call session "
                      f"{figures['session_cpu_ms']} ms nats-server {figures['nats_cpu_ms']} ms"
                      if "server_mean_ms" in figures else "")
            lines.append(f"{path:5} {name:28} {rate}p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
                         f"n={figures['count']}{conc}{server}")
    for label, key in (("session process idle", "session_process_idle_kib"),
                       ("session process after load", "session_process_kib"),
                       ("nats-server after fill", "nats_after_fill_kib"), ("nats-server at the end", "nats_kib")):
        if key in results:
            kib = results[key]
            lines.append(f"{label:28} RSS {kib['VmRSS'] / 1024:.0f} MiB (peak {kib['VmHWM'] / 1024:.0f} MiB)")
    lines.append(f"JetStream store on disk: {results['jetstream_store_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.session_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000, help="sessions to store (default 100000)")
    parser.add_argument("--messages", type=int, default=3, choices=range(1, len(TURNS) + 1),
                        metavar=f"1..{len(TURNS)}", help="messages per session (default 3)")
    parser.add_argument("--fill", choices=("direct", "store"), default="direct",
                        help="direct: pipelined writes of the store's records (seconds for 100k); "
                             "store: SessionStore.append, --fill-concurrency at a time")
    parser.add_argument("--fill-concurrency", type=int, default=256)
    parser.add_argument("--max-fill-s", type=float, default=600.0, help="stop filling after this long")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent appenders while measuring")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC service measurements")
    parser.add_argument("--begin-turn-only", action="store_true",
                        help="through gRPC, measure BeginTurn only (no store, append or BuildContext figures)")
    parser.add_argument("--quick", action="store_true", help="2,000 sessions, 3 s per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.seconds = min(args.sessions, 2000), min(args.seconds, 3.0)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with bench_work_dir("kefu-session-bench-") as work:
        results = asyncio.run(run(args, work.path))
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
