"""`python -m bench.edge_bench`: the edge's OpenAI-compatible /v1/chat/completions against the direct path.

In one run:

1. Rates. The fake upstream (its own process) and a kefu stack pointed at it, as `make
   bench` starts them. For each mode (`json`: non-streaming, `stream`: SSE), each
   concurrency (100, 1000) and each path (`direct`: the client straight to the upstream;
   `kefu`: the same body to the edge with `model: "default"` and a JWT per virtual user):
   `concurrency` connections are opened first (cheap GETs), then `--rounds` rounds run with
   the paths alternating; in a round every virtual user sends `--min-requests / concurrency`
   requests (at least 1) in a closed loop. Throughput is a round's answers over its whole
   wall time, so it covers whole cycles: a saturated kefu shares the CPU among all open
   turns, and turns started together end together, in waves a shorter window would cut.
   The table shows the median over the rounds and the spread.
2. Open streams (bench/open_streams.py). A fresh stack whose upstream streams very slowly;
   streams are opened gradually up to each `--levels` level, and at each one the RSS of every
   process, the stream gauges and the CPU spent holding them are sampled.

Results: bench/results/edge-<UTC>.json, and the markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.chat_params import BenchParams
from bench.chat_stack import edge_metrics_url, fetch_json, start_stack, start_upstream
from bench.edge_load import Principals, completion_body, run_rates, targets
from bench.edge_params import QUICK, EdgeParams
from bench.edge_report import combine, had_errors, render_markdown
from bench.open_streams import OpenStreamsSpec, open_files_limit, raise_open_files_limit, run_open_streams
from bench.proc_stats import stack_pids
from bench.processes import bench_work_dir, stop_process
from bench.results_io import RESULTS_DIR, machine, write_atomic
from bench.stack_logs import log_problems
from devtools.devstack.stack import Stack

log = logging.getLogger("bench.edge")


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> tuple[EdgeParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.edge_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 round, open streams up to 1000 only: about 1.5 minutes")
    parser.add_argument("--concurrency", help="comma-separated virtual users (default 100,1000)")
    parser.add_argument("--modes", help="comma-separated, of json,stream (default both)")
    parser.add_argument("--rounds", type=int, help="measured rounds per mode, concurrency and path (default 3)")
    parser.add_argument("--min-requests", type=int,
                        help="requests per round: each user sends this // concurrency, at least 1 (default 300)")
    parser.add_argument("--ttft-ms", type=float, help="rates: upstream time to first token (default 50)")
    parser.add_argument("--chunks", type=int, help="rates: upstream content chunks (default 20)")
    parser.add_argument("--interval-ms", type=float, help="rates: upstream delay between chunks (default 10)")
    parser.add_argument("--timeout-s", type=float, help="rates: deadline of one request (default 120)")
    parser.add_argument("--levels", help="open-stream levels (default 1000,5000,10000)")
    parser.add_argument("--open-parallel", type=int, help="streams opening at once (default 200)")
    parser.add_argument("--open-interval-ms", type=float, help="slow upstream's chunk interval (default 30000)")
    parser.add_argument("--open-chunks", type=int, help="slow upstream's chunks per answer (default 30)")
    parser.add_argument("--open-budget-s", type=float, help="longest open-streams ramp (default 300)")
    parser.add_argument("--no-rates", dest="rates", action="store_false", default=None)
    parser.add_argument("--no-open-streams", dest="open_streams", action="store_false", default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary data and log folders")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else EdgeParams()
    names = ("rounds", "min_requests", "ttft_ms", "chunks", "interval_ms", "timeout_s",
             "open_parallel", "open_interval_ms", "open_chunks", "open_budget_s", "rates", "open_streams")
    overrides: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        if args.concurrency:
            overrides["concurrency"] = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
        if args.levels:
            overrides["levels"] = tuple(int(c) for c in args.levels.split(",") if c.strip())
        if args.modes:
            overrides["modes"] = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        return replace(base, **overrides), args
    except ValueError as error:
        parser.error(str(error))


# ---------------------------------------------------------------- stacks and logs


def start_slow_stack(work_dir: Path, upstream_url: str, secret: str) -> Stack:
    """The main bench's stack (bench/chat_stack.py), with stream deadlines long enough for a slow ramp (the
    worker's whole-stream deadline defaults to 120 s)."""
    return start_stack(work_dir, upstream_url, secret,
                       {"KEFU_UPSTREAM_TIMEOUT_S": "3600", "KEFU_STREAM_TIMEOUT_S": "3600"})


def _processes(stack: Stack, upstream_pid: int) -> dict[str, int]:
    return {"client": os.getpid(), "upstream": upstream_pid, **stack_pids(stack)}


def _limits(processes: Mapping[str, int]) -> dict[str, int | None]:
    return {name: open_files_limit(pid) for name, pid in processes.items()}


# ---------------------------------------------------------------- the two phases


def rates_phase(params: EdgeParams, work_dir: Path, secret: str) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    upstream_params = BenchParams(ttft_ms=params.ttft_ms, chunks=params.chunks, interval_ms=params.interval_ms)
    upstream, upstream_url = start_upstream(upstream_params, work_dir / "upstream.log")
    stack: Stack | None = None
    try:
        stack = start_stack(work_dir, upstream_url, secret)
        processes = _processes(stack, upstream.pid)
        stats_url = upstream_url.removesuffix("/v1") + "/stats"
        principals = Principals(secret)
        for user in range(max(params.concurrency)):
            principals.headers(user)  # mint before anything is timed
        found = targets(upstream_url, stack.base_url, principals)
        cheap = {"direct": f"{upstream_url}/models", "kefu": f"{stack.base_url}/healthz"}
        loads = asyncio.run(run_rates(params, found, processes, cheap, stats_url))
        limits = _limits(processes)
        stats = fetch_json(stats_url)
    finally:
        if stack is not None:
            stack.stop()
        stop_process(upstream)
    medians: dict[str, dict[int, dict[str, Any]]] = {}
    for load in loads:
        medians.setdefault(load.mode, {}).setdefault(load.concurrency, {})[load.path] = combine(load)
    return {
        "upstream": {"base_url": upstream_url, "stats": stats},
        "open_files_limit": limits,
        "medians": medians,
        "rounds": [{"mode": load.mode, "path": load.path, "round": i, "cpu_ms_per_request": r.cpu_ms_per_request,
                    "cpu_percent": r.cpu_percent, **r.result.to_dict()}
                   for load in loads for i, r in enumerate(load.rounds)],
        "problems_in_logs": log_problems(work_dir / "logs"),
    }


def open_streams_phase(params: EdgeParams, work_dir: Path, secret: str) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    upstream_params = BenchParams(ttft_ms=20.0, chunks=params.open_chunks, interval_ms=params.open_interval_ms)
    upstream, upstream_url = start_upstream(upstream_params, work_dir / "upstream.log")
    stack: Stack | None = None
    try:
        stack = start_slow_stack(work_dir, upstream_url, secret)
        processes = _processes(stack, upstream.pid)
        principals = Principals(secret)
        for user in range(max(params.levels)):
            principals.headers(user)  # mint before the ramp, not during it
        spec = OpenStreamsSpec(
            url=f"{stack.base_url}/v1/chat/completions",
            metrics_urls={"gateway": edge_metrics_url(stack),
                          "llm_worker": f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics"},
            upstream_stats_url=upstream_url.removesuffix("/v1") + "/stats",
            levels=params.levels, parallel=params.open_parallel, budget_s=params.open_budget_s)
        polls = {name: p.poll for name, p in stack.processes.items()}
        polls["upstream"] = upstream.poll

        def body(user: int) -> Mapping[str, object]:
            return completion_body("default", True, f"您好，第 {user} 位顾客：请问我的订单什么时候发货？")

        result = asyncio.run(run_open_streams(spec, body, principals.headers, processes, polls))
        result["open_files_limit"] = _limits(processes)
        result["stream_seconds"] = (params.open_chunks - 1) * params.open_interval_ms / 1000
        result["upstream"] = {"base_url": upstream_url, "chunk_interval_ms": params.open_interval_ms,
                              "chunks": params.open_chunks}
    finally:
        if stack is not None:
            stack.stop()
        stop_process(upstream)
    result["problems_in_logs"] = log_problems(work_dir / "logs")
    return result


# ---------------------------------------------------------------- main


def run(params: EdgeParams, work_dir: Path) -> dict[str, Any]:
    started, loadavg_start = datetime.now(UTC), os.getloadavg()
    soft, _ = raise_open_files_limit()
    secret = secrets.token_hex(32)
    report: dict[str, Any] = {"timestamp": started.strftime("%Y%m%dT%H%M%SZ"), "parameters": asdict(params)}
    if params.rates:
        report["rates"] = rates_phase(params, work_dir / "rates", secret)
    if params.open_streams:
        report["open_streams"] = open_streams_phase(params, work_dir / "open_streams", secret)
    report["machine"] = {**machine(loadavg_start), "open_files_limit": soft,
                         "seconds": round((datetime.now(UTC) - started).total_seconds())}
    return report


def main(argv: Sequence[str] | None = None) -> None:
    params, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    with bench_work_dir("kefu-edge-bench-", args.keep_logs) as work:
        report = run(params, work.path)
        work.keep = work.keep or had_errors(report)
    report["markdown"] = render_markdown(report)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"edge-{report['timestamp']}.json"
    write_atomic(json_path, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    print(report["markdown"], end="")
    log.info("wrote %s in %d s", json_path, report["machine"]["seconds"])


if __name__ == "__main__":
    main()
