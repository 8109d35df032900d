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
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
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
from bench.security_load import ATTACKS, Visitor, attack, login
from bench.security_params import AGENT, AGENT_PASSWORD, OTHER_AGENT, SECRET_ENV, TENANT, SecurityParams
from bench.security_report import Phase, render
from devtools.devstack.stack import REPO_ROOT, Stack
from gateway.directory.agents import AgentAccounts
from gateway.directory.buckets import Buckets

log = logging.getLogger("bench.security")


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
                # The defaults a deployment runs with (bench/chat_stack.py lifts them to measure the turn).
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
