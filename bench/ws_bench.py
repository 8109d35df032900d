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
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench import grpc_floor
from bench.open_streams import raise_open_files_limit
from bench.proc_stats import memory_mib, stack_pids
from bench.processes import bench_work_dir, read_line, stop_process
from bench.results_io import RESULTS_DIR, machine, write_atomic
from bench.stack_logs import log_problems
from bench.ws_idle_phase import idle_phase
from bench.ws_latency_phase import latency_run
from bench.ws_params import PHASES, QUICK, WsBenchParams
from bench.ws_report import highest_rate_within, render_markdown
from bench.ws_resume_phase import resume_phase
from devtools.devstack.stack import REPO_ROOT, Stack, StackConfig, StackPorts, free_port

log = logging.getLogger("bench.ws")


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


def start_floor(heartbeat_s: float, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "bench.ws_floor", "--heartbeat-s", f"{heartbeat_s:g}"],
                                   cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log_file, start_new_session=True)
    try:
        line = read_line(process, 20, "the floor server")
    except BaseException:
        stop_process(process)
        raise
    return process, line.split()[-1]


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
            pids = stack_pids(stack)
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
    report["machine"] = {**machine(loadavg_start), "open_files_limit": soft,
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
    write_atomic(json_path, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    print(report["markdown"], end="")
    log.info("wrote %s in %d s", json_path, report["machine"]["seconds"])


if __name__ == "__main__":
    main()
