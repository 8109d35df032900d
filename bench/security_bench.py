"""`python -m bench.security_bench`: other visitors' /v1/chat latency while the edge is attacked (issue 17).

One kefu stack against the fake upstream (cache off, so every turn reaches it). The ordinary visitors come
through a trusted proxy (127.0.0.1, as behind an ingress); the attacker connects from loopback addresses of
its own (Linux answers all of 127/8), so the edge's connection guard sees it as a stranger would be seen
without a proxy in front. Throughout every phase, `--visitors` ordinary
visitors each send one /v1/chat turn every `--interval-s` (as people do; a visitor's own message rate
is limited) in their own conversation, and the bench times each whole answer. Phases of `--duration-s`:

- `idle`: nothing else.
- `login flood, one address`: waves of 100 parallel wrong console logins from one address (127.0.0.50),
  repeated, on keep-alive connections (reconnecting when cut).
- `login flood, 100 addresses`: waves of 100 parallel logins, every one from a fresh address (127.100.0.1,
  ...) on a connection of its own and for a user name of its own, so only the argon2 verification slots
  stand between the flood and the CPU (a botnet).
- `visitor flood`: one visitor token sending /v1/chat turns from 8 connections and WebSocket `send`
  frames from 3 sockets (reconnecting when closed) as fast as the edge lets it, from 127.0.0.50.

The phases run `--rounds` times, interleaved. For each phase: the visitors' p50/p99 over all rounds
and its ratio to idle, each round's p99 and the median of the rounds' ratios to the same round's idle
(issue 17 wants p99 within 2x), the machine's load average, the attack's answers by status, /readyz
during the phase, each kefu process's CPU, and the edge's RSS (VmRSS sampled every 50 ms). The
attacker runs in a process of its own, but on the same cores as kefu. A real console login after the
floods must still work. The attacker runs at nice 10 (`--attacker-nice`): a real attacker's CPU is not
the edge's machine's. Per phase also the attacker's attempts a second, and how the edge refused them:
closed at accept by the connection guard (`kefu_connections_cut_total` by reason) or answered 429.
Results: bench/results/security-<UTC>.json and the markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import nats
from nats.aio.client import Client as NatsClient

from bench.chat_params import BenchParams
from bench.chat_stack import edge_metrics_url, start_stack, start_upstream
from bench.loadgen import percentile
from bench.proc_stats import cpu_seconds, memory_kib
from bench.processes import bench_work_dir, stop_process
from bench.results_io import RESULTS_DIR, write_atomic
from bench.sse_reader import read_sse
from devtools.devstack.stack import REPO_ROOT, Stack
from devtools.mint_token import mint
from gateway.directory.agents import AgentAccounts
from gateway.directory.buckets import Buckets

log = logging.getLogger("bench.security")

TENANT = "shop1"
AGENT, AGENT_PASSWORD = "bench-agent", "the bench agent's password"
"""The one-address login flood guesses this agent's password (its user-name bucket runs dry)."""
OTHER_AGENT = "bench-agent-2"
K8S_EDGE_MEMORY_LIMIT_MIB = 256  # k8s/base/edge.yaml
ATTACKER_ADDRESS = "127.0.0.50"
"""Where the one-address attacks come from; not a trusted proxy."""
SECRET_ENV = "BENCH_SECURITY_JWT_SECRET"
"""How the attacker process gets the stack's JWT secret (not on its command line)."""


@dataclass(frozen=True, slots=True)
class SecurityParams:
    duration_s: float = 10.0
    visitors: int = 20
    interval_s: float = 1.25
    login_wave: int = 100
    rounds: int = 3
    """Each phase this many times, interleaved: a busy neighbour on the machine then spoils one round, not
    one phase (the report gives the pooled figures and the median of the rounds' ratios)."""

    def __post_init__(self) -> None:
        if min(self.duration_s, self.visitors, self.interval_s, self.login_wave, self.rounds) <= 0:
            raise ValueError("--duration-s, --visitors, --interval-s, --login-wave and --rounds must be positive")


@dataclass
class Phase:
    name: str
    latencies_s: list[float] = field(default_factory=list)
    visitor_errors: Counter[str] = field(default_factory=Counter)
    attack: Counter[str] = field(default_factory=Counter)
    readyz: Counter[int] = field(default_factory=Counter)
    rss_mib: list[float] = field(default_factory=list)
    round_p99_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds each kefu process spent during this phase's rounds."""
    load_average: list[float] = field(default_factory=list)
    """The machine's 1-minute load average at the end of each round (2 cores here: above 2 is contention)."""
    edge_counters: dict[str, float] = field(default_factory=dict)
    """What the edge's own counters (connection guard, 429s) rose by during this phase's rounds."""

    def summary(self, idle: Phase) -> dict[str, Any]:
        p50 = percentile(self.latencies_s, 50) if self.latencies_s else None
        p99 = percentile(self.latencies_s, 99) if self.latencies_s else None
        idle_p99 = percentile(idle.latencies_s, 99) if idle.latencies_s else None
        ratios = [mine / theirs for mine, theirs in zip(self.round_p99_s, idle.round_p99_s, strict=False) if theirs]
        attempts = sum(self.attack.values())
        refused_429 = sum(n for kind, n in self.attack.items() if " 429" in kind or kind.endswith("nack"))
        return {"phase": self.name, "turns": len(self.latencies_s), "visitor_errors": dict(self.visitor_errors),
                "p50_ms": p50 and p50 * 1e3, "p99_ms": p99 and p99 * 1e3,
                "p99_vs_idle": p99 / idle_p99 if p99 and idle_p99 else None,
                "round_p99_ms": [round(v * 1e3, 1) for v in self.round_p99_s],
                "round_p99_vs_idle_median": statistics.median(ratios) if ratios else None,
                "load_average": self.load_average,
                "cpu_share": {name: round(seconds / self.seconds, 2) for name, seconds in self.cpu_s.items()}
                if self.seconds else {},
                "attack": dict(sorted(self.attack.items())),
                "attacker_attempts_per_s": round(attempts / self.seconds, 1) if self.seconds else None,
                "refused_at_accept": {reason: int(self.edge_counters.get(f"cut {reason}", 0))
                                      for reason in ("rate", "penalty")},
                "penalty_windows": int(self.edge_counters.get("penalties", 0)),
                "refused_429": refused_429, "edge_counters": dict(sorted(self.edge_counters.items())),
                "readyz": {str(k): v for k, v in self.readyz.items()},
                "rss_mib_max": max(self.rss_mib, default=None), "rss_mib_min": min(self.rss_mib, default=None)}


# ---------------------------------------------------------------- the ordinary visitors


class Visitor:
    """One person: a token, a conversation, one turn every `interval_s`."""

    def __init__(self, base_url: str, secret: str, index: int, interval_s: float) -> None:
        self.url = f"{base_url}/v1/chat"
        token = mint(secret, tenant=TENANT, subject=f"v_bench_{index}", role="visitor", ttl_s=3600)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.index = index
        self.interval_s = interval_s
        self.session_id: str | None = None
        self.turns = itertools.count()

    async def turn(self, http: aiohttp.ClientSession) -> tuple[float | None, str]:
        """(seconds to the end of the answer, "") or (None, what went wrong)."""
        body: dict[str, Any] = {"message": f"请问第 {next(self.turns)} 个订单什么时候发货？"}
        if self.session_id:
            body["session_id"] = self.session_id
        started = time.perf_counter()
        try:
            async with http.post(self.url, json=body, headers=self.headers) as response:
                if response.status != 200:
                    return None, f"http_{response.status}"
                async for event in read_sse(response):
                    if event.event == "session":
                        self.session_id = event.json()["session_id"]
                    elif event.event == "done":
                        return time.perf_counter() - started, ""
                    elif event.event == "error":
                        return None, event.json().get("code", "error")
                return None, "incomplete_stream"
        except (aiohttp.ClientError, TimeoutError) as error:
            return None, type(error).__name__

    async def run(self, http: aiohttp.ClientSession, phase: Phase, until: float) -> None:
        await asyncio.sleep(self.index * 0.05 % 1.0)  # spread the visitors over the interval
        while time.monotonic() < until:
            started = time.monotonic()
            seconds, error = await self.turn(http)
            if seconds is None:
                phase.visitor_errors[error] += 1
            else:
                phase.latencies_s.append(seconds)
            await asyncio.sleep(max(0.0, started + self.interval_s - time.monotonic()))


# ---------------------------------------------------------------- the attacks


def from_address(address: str, *, limit: int = 0, force_close: bool = False) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (any 127.0.0.0/8 address is this machine's)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=limit, force_close=force_close),
        timeout=aiohttp.ClientTimeout(total=60))


async def login(http: aiohttp.ClientSession, base_url: str, username: str, password: str,
                headers: dict[str, str] | None = None) -> str:
    """The answer's status, or "cut" when the edge closed the connection without one."""
    try:
        async with http.post(f"{base_url}/v1/console/login", headers=headers,
                             json={"tenant": TENANT, "username": username, "password": password}) as response:
            await response.read()
            return str(response.status)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        return "cut"
    except (aiohttp.ClientError, TimeoutError) as error:
        return type(error).__name__


async def login_from(address: str, base_url: str, username: str, password: str) -> str:
    async with from_address(address, force_close=True) as http:
        return await login(http, base_url, username, password)


async def login_flood(base_url: str, distributed: bool, wave_size: int, counts: Counter[str], until: float) -> None:
    async with from_address(ATTACKER_ADDRESS) as http:
        for wave in itertools.count():
            if time.monotonic() >= until:
                return
            if distributed:  # an address and a user name of its own for every login
                logins = [login_from(f"127.{100 + wave // 250 % 100}.{wave % 250}.{i + 1}", base_url,
                                     f"nobody-{wave}-{i}", "wrong password") for i in range(wave_size)]
            else:
                logins = [login(http, base_url, AGENT, f"guess {wave}-{i}") for i in range(wave_size)]
            for status in await asyncio.gather(*logins):
                counts[f"login {status}"] += 1


async def visitor_flood(http: aiohttp.ClientSession, base_url: str, secret: str, counts: Counter[str],
                        until: float) -> None:
    """`http` connects from the attacker's address."""
    token = mint(secret, tenant=TENANT, subject="v_bench_attacker", role="visitor", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}

    async def chats() -> None:
        session_id = None
        for n in itertools.count():
            if time.monotonic() >= until:
                return
            body: dict[str, Any] = {"message": f"flood {n}"}
            if session_id:
                body["session_id"] = session_id
            try:
                async with http.post(f"{base_url}/v1/chat", json=body, headers=headers) as response:
                    if response.status != 200:
                        counts[f"chat {response.status}"] += 1
                        await response.read()
                        continue
                    async for event in read_sse(response):
                        if event.event == "session":
                            session_id = event.json()["session_id"]
                        elif event.event in ("done", "error"):  # an answer, or refused inside the stream
                            outcome = "done" if event.event == "done" else event.json().get("code", "error")
                            counts[f"chat 200 {outcome}"] += 1
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                counts["chat cut"] += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                counts[f"chat {type(error).__name__}"] += 1

    async def socket() -> None:
        while time.monotonic() < until:
            try:
                async with http.ws_connect(f"{base_url.replace('http', 'ws', 1)}/v1/ws") as ws:
                    await ws.send_json({"type": "hello", "token": token})

                    async def read() -> None:
                        async for message in ws:
                            if message.type == aiohttp.WSMsgType.TEXT:
                                kind = json.loads(message.data).get("type")
                                if kind in ("ack", "nack", "error"):
                                    counts[f"ws {kind}"] += 1

                    reader = asyncio.create_task(read())
                    try:
                        for n in itertools.count():
                            if time.monotonic() >= until or ws.closed:
                                break
                            await ws.send_json({"type": "send", "cid": secrets.token_hex(6), "text": f"ws flood {n}"})
                            await asyncio.sleep(0)
                    finally:
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reader
                    counts[f"ws close {ws.close_code}"] += 1
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError):
                counts["ws cut"] += 1
                await asyncio.sleep(0.05)
            except (aiohttp.ClientError, TimeoutError) as error:
                counts[f"ws {type(error).__name__}"] += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(chats() for _ in range(8)), *(socket() for _ in range(3)))


# ---------------------------------------------------------------- one phase


EDGE_COUNTERS = {"kefu_connections_cut_total": "cut", "kefu_connection_penalties_total": "penalties",
                 "kefu_rate_limited_total": "429", "kefu_console_logins_total": "login"}
"""The edge's counters of how it refused the attack, and the short names the report gives them."""


async def edge_counters(http: aiohttp.ClientSession, stack: Stack) -> dict[str, float]:
    """{"cut rate": n, "penalties": n, "429 principal": n, "login busy": n, ...} from the edge's /metrics."""
    counters: dict[str, float] = {}
    try:
        async with http.get(edge_metrics_url(stack)) as response:
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return counters
    for line in text.splitlines():
        name, _, rest = line.partition("{") if "{" in line else line.partition(" ")
        short = EDGE_COUNTERS.get(name.strip())
        if short is None:
            continue
        label = rest.split('"')[1] if '"' in rest else ""
        key = f"{short} {label}".strip()
        counters[key] = counters.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counters


ATTACKS = ("login-one-address", "login-many-addresses", "visitor")


async def attack(mode: str, base_url: str, secret: str, params: SecurityParams) -> Counter[str]:
    """One attack for `params.duration_s`, in its own process (see run_phase); the answers it got, by kind."""
    counts: Counter[str] = Counter()
    until = time.monotonic() + params.duration_s
    if mode == "visitor":
        async with from_address(ATTACKER_ADDRESS) as http:
            await visitor_flood(http, base_url, secret, counts, until)
    else:
        await login_flood(base_url, mode == "login-many-addresses", params.login_wave, counts, until)
    return counts


async def run_phase(phase: Phase, stack: Stack, visitors: Sequence[Visitor], params: SecurityParams,
                    secret: str, mode: str | None, attacker_nice: int) -> None:
    """One round of the visitors' turns into `phase`, with the attack `mode` running meanwhile in a process
    of its own: in the same event loop, the attacker's client work would delay the visitors' reading and
    pass for edge latency."""
    turns_before = len(phase.latencies_s)
    pids = {name: process.pid for name, process in stack.processes.items()}
    cpu_before = {name: cpu_seconds(pid) or 0.0 for name, pid in pids.items()}
    started = time.monotonic()
    attacker = None
    if mode is not None:
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.security_bench", "--attack", mode, "--base-url", stack.base_url,
            "--duration-s", str(params.duration_s), "--login-wave", str(params.login_wave),
            "--attacker-nice", str(attacker_nice),
            env={**os.environ, SECRET_ENV: secret}, stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT)
    pid = stack.processes["gateway"].pid
    until = time.monotonic() + params.duration_s

    async def watch(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < until:
            phase.rss_mib.append(memory_kib(pid)["VmRSS"] / 1024)
            if len(phase.rss_mib) % 10 == 0:
                try:
                    async with http.get(f"{stack.base_url}/readyz") as response:
                        phase.readyz[response.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    phase.readyz[0] += 1
            await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
        counters_before = await edge_counters(http, stack)
        await asyncio.gather(watch(http), *(visitor.run(http, phase, until) for visitor in visitors))
    if attacker is not None:
        output, _ = await attacker.communicate()
        phase.attack.update(json.loads(output.decode().strip().splitlines()[-1]))
    async with aiohttp.ClientSession(timeout=timeout) as http:
        counters_after = await edge_counters(http, stack)
    for key, value in counters_after.items():
        if value > counters_before.get(key, 0.0):
            phase.edge_counters[key] = phase.edge_counters.get(key, 0.0) + value - counters_before.get(key, 0.0)
    phase.seconds += time.monotonic() - started
    for name, pid in pids.items():
        phase.cpu_s[name] = phase.cpu_s.get(name, 0.0) + (cpu_seconds(pid) or 0.0) - cpu_before[name]
    this_round = phase.latencies_s[turns_before:]
    if this_round:
        phase.round_p99_s.append(percentile(this_round, 99))
    phase.load_average.append(round(os.getloadavg()[0], 2))
    log.info("%s: %d turns, p99 %s, %s", phase.name, len(this_round), phase.round_p99_s[-1:], dict(phase.attack))


async def add_agent(stack: Stack) -> None:
    nc = await nats.connect(stack.nats_url, connect_timeout=5, max_reconnect_attempts=3)

    async def connection() -> NatsClient:
        return nc

    try:
        for username in (AGENT, OTHER_AGENT):
            await AgentAccounts(Buckets(connection)).add(TENANT, username, AGENT_PASSWORD)
    finally:
        await nc.close()


async def measure(stack: Stack, secret: str, params: SecurityParams, attacker_nice: int) -> dict[str, Any]:
    await add_agent(stack)
    visitors = [Visitor(stack.base_url, secret, i, params.interval_s) for i in range(params.visitors)]
    async with aiohttp.ClientSession() as http:  # every visitor's conversation exists before timing starts
        for visitor in visitors:
            await visitor.turn(http)
    await asyncio.sleep(1.5)  # the visitors' message buckets refill
    before = memory_kib(stack.processes["gateway"].pid)["VmRSS"] / 1024
    modes = {"idle": None, "login flood, one address": "login-one-address",
             "login flood, 100 addresses": "login-many-addresses", "visitor flood": "visitor"}
    phases = {name: Phase(name) for name in modes}
    for _ in range(params.rounds):
        for name, mode in modes.items():
            await run_phase(phases[name], stack, visitors, params, secret, mode, attacker_nice)
            await asyncio.sleep(1.0)  # the visitors' message buckets refill between phases
    async with aiohttp.ClientSession() as http:
        after_login = {username: await login(http, stack.base_url, username, AGENT_PASSWORD,
                                             headers={"X-Forwarded-For": "10.251.0.1"})
                       for username in (OTHER_AGENT, AGENT)}
    return {"edge_rss_mib_before": before, "real_login_after": after_login,
            "phases": [phase.summary(phases["idle"]) for phase in phases.values()]}


def render(report: dict[str, Any]) -> str:
    def cell(value: float | None, fmt: str = ".0f") -> str:
        return "–" if value is None else format(value, fmt)

    params = report["params"]
    lines = [f"# Security bench {report['started']}", "",
             f"{params['visitors']} visitors, one /v1/chat turn each every {params['interval_s']} s; "
             f"{params['duration_s']:g} s per phase, {params['rounds']} rounds; "
             f"edge RSS before {report['edge_rss_mib_before']:.0f} MiB "
             f"(k8s limit {K8S_EDGE_MEMORY_LIMIT_MIB} MiB). Real console logins afterwards, from a fresh "
             f"address: another agent HTTP {report['real_login_after'][OTHER_AGENT]}, the agent the flood "
             f"guessed at HTTP {report['real_login_after'][AGENT]} (429 until its failure bucket has a token "
             f"again, one a minute by default). Attacker at nice {report['attacker_nice']}. Load average "
             f"{report.get('load_average_start', '–')} at the start.", "",
             "| phase | turns | visitor errors | p50 ms | p99 ms | p99 / idle | rounds' p99 ms | median of the "
             "rounds' p99 / idle | load average | CPU (cores) of edge, session, moderation, worker "
             "| edge RSS max MiB | readyz | attack answers/s | cut at accept (rate, penalty) | 429 or nack "
             "| attack answers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    processes = ("gateway", "session", "moderation", "llm_worker")
    for p in report["phases"]:
        lines.append(f"| {p['phase']} | {p['turns']} | {json.dumps(p['visitor_errors']) if p['visitor_errors'] else 0} "
                     f"| {cell(p['p50_ms'])} | {cell(p['p99_ms'])} | {cell(p['p99_vs_idle'], '.2f')} "
                     f"| {', '.join(f'{v:.0f}' for v in p['round_p99_ms'])} "
                     f"| {cell(p['round_p99_vs_idle_median'], '.2f')} | {', '.join(map(str, p['load_average']))} "
                     f"| {', '.join(str(p['cpu_share'].get(name, '–')) for name in processes)} "
                     f"| {cell(p['rss_mib_max'])} | {json.dumps(p['readyz'])} | {cell(p['attacker_attempts_per_s'])} "
                     f"| {p['refused_at_accept']['rate']}, {p['refused_at_accept']['penalty']} "
                     f"({p['penalty_windows']} windows) | {p['refused_429']} | {json.dumps(p['attack'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> tuple[SecurityParams, dict[str, str], argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.security_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SecurityParams()
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s, help="length of each phase")
    parser.add_argument("--visitors", type=int, default=defaults.visitors, help="ordinary visitors")
    parser.add_argument("--interval-s", type=float, default=defaults.interval_s, help="a visitor's time between turns")
    parser.add_argument("--login-wave", type=int, default=defaults.login_wave, help="parallel logins per wave")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds of every phase, interleaved")
    parser.add_argument("--env", action="append", default=[], metavar="KEFU_X=VALUE",
                        help="a setting for every process of the stack (repeatable), e.g. KEFU_LOGIN_MAX_CONCURRENT=1")
    parser.add_argument("--attack", choices=ATTACKS, help=argparse.SUPPRESS)  # the attacker process of a phase
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--attacker-nice", type=int, default=10,
                        help="niceness of the attacker process (default 10): a real attacker's CPU is not the "
                             "edge's, so here it takes what kefu leaves; 0 lets it compete")
    args = parser.parse_args(argv)
    extra_env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("KEFU_"):
            parser.error(f"--env wants KEFU_NAME=value, got {item!r}")
        extra_env[name] = value
    return (SecurityParams(args.duration_s, args.visitors, args.interval_s, args.login_wave, args.rounds), extra_env,
            args)


def main(argv: Sequence[str] | None = None) -> None:
    params, extra_env, args = parse_args(argv)
    if args.attack:  # the attacker process of one phase: its counts as the last line of stdout
        os.nice(args.attacker_nice)
        counts = asyncio.run(attack(args.attack, args.base_url, os.environ[SECRET_ENV], params))
        print(json.dumps(counts))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    load_start = os.getloadavg()
    secret = secrets.token_hex(32)
    with bench_work_dir("kefu-security-bench-") as work:
        upstream, upstream_url = start_upstream(BenchParams(ttft_ms=20, chunks=8, interval_ms=5),
                                                work.path / "upstream.log")
        stack: Stack | None = None
        try:
            stack = start_stack(work.path, upstream_url, secret, {
                "KEFU_CACHE_ENABLED": "false", "KEFU_TRUSTED_PROXIES": "127.0.0.1", "KEFU_LOG_LEVEL": "WARNING",
                # The defaults a deployment runs with (bench/__main__ lifts them to measure the turn).
                "KEFU_VISITOR_MSG_RPS": "1", "KEFU_VISITOR_MSG_BURST": "10", "KEFU_CONN_GUARD": "true", **extra_env})
            report = asyncio.run(measure(stack, secret, params, args.attacker_nice))
        finally:
            if stack is not None:
                stack.stop()
            stop_process(upstream)
    report = {"started": started, "params": asdict(params), "env": extra_env, "attacker_nice": args.attacker_nice,
              "load_average_start": [round(v, 2) for v in load_start],
              **report}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS_DIR / f"security-{started}.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(render(report), end="")


if __name__ == "__main__":
    main()
