"""`python -m bench` (`make bench`): kefu's /v1/chat against the direct path to the same fake upstream."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.arrivals import ARRIVALS
from bench.chat_load import run_rounds, targets
from bench.chat_params import QUICK, BenchParams
from bench.chat_report import (
    KEFU_PROCESSES,
    build_report,
    highest_rate_within,
    medians_by_concurrency,
    open_loop_rows,
    render_markdown,
    write_results,
)
from bench.chat_stack import fetch_json, start_stack, start_upstream
from bench.proc_stats import Processes, memory_mib, stack_pids
from bench.processes import bench_work_dir, stop_process
from bench.results_io import RESULTS_DIR
from devtools.devstack.stack import Stack

log = logging.getLogger("bench")


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> tuple[BenchParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--concurrency", help="comma-separated virtual users per run (default 10,100; '' none)")
    parser.add_argument("--rates", help="open loop: comma-separated arrival rates per second "
                                        "(default 10,20,40,60,80; '' none)")
    parser.add_argument("--open-s", type=float, help="open loop: seconds of arrivals per rate and path (default 5)")
    parser.add_argument("--arrivals", choices=ARRIVALS, help="open loop: evenly spaced (default) or Poisson")
    parser.add_argument("--requests-per-user", type=int,
                        help="requests per virtual user per run (default 10)")
    parser.add_argument("--rounds", type=int, help="measured rounds per concurrency and path (default 3)")
    parser.add_argument("--warmup", type=int, help="unreported requests per path first (default 20)")
    parser.add_argument("--ttft-ms", type=float, help="upstream time to first token (default 50)")
    parser.add_argument("--chunks", type=int, help="upstream content chunks per answer (default 20)")
    parser.add_argument("--interval-ms", type=float, help="upstream delay between chunks (default 10)")
    parser.add_argument("--timeout-s", type=float, help="deadline of one request (default 60)")
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 2 requests per user, rates 10 and 40 for 3 s: about 25 s")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary data and log folder")
    parser.add_argument("--env", action="append", default=[], metavar="KEFU_NAME=VALUE",
                        help="a setting for kefu's processes, repeatable (A/B runs: KEFU_UVLOOP=0, "
                             "KEFU_STREAM_WINDOW_MS=0)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else BenchParams()
    given = {name: getattr(args, name) for name in ("requests_per_user", "rounds", "warmup", "ttft_ms",
                                                     "chunks", "interval_ms", "timeout_s", "open_s",
                                                     "arrivals")}
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if any(not item.startswith("KEFU_") or "=" not in item for item in args.env):
        parser.error(f"--env takes KEFU_NAME=VALUE, got {args.env}")
    try:
        if args.concurrency is not None:
            overrides["concurrency"] = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
        if args.rates is not None:
            overrides["rates"] = tuple(float(r) for r in args.rates.split(",") if r.strip())
        return replace(base, **overrides), args
    except ValueError as error:
        parser.error(str(error))


def _write(path: Path, text: str) -> None:
    """Write through a temporary file (git-ignored) so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- main


def run(params: BenchParams, work_dir: Path, results_dir: Path,
        kefu_env: Mapping[str, str] | None = None) -> tuple[str, Path, bool]:
    """Start everything, measure, stop everything; return the markdown, the JSON path and 'had errors'."""
    started, loadavg_start = datetime.now(UTC), os.getloadavg()
    secret = secrets.token_hex(32)
    upstream_process, upstream_url = start_upstream(params, work_dir / "upstream.log")
    stack: Stack | None = None
    try:
        log.info("fake upstream at %s; starting kefu (logs in %s)", upstream_url, work_dir / "logs")
        stack = start_stack(work_dir, upstream_url, secret, kefu_env)
        processes: Processes = {"client": os.getpid(), "upstream": upstream_process.pid, **stack_pids(stack)}
        paths = targets(upstream_url, stack.base_url, secret)
        measured, idle = asyncio.run(run_rounds(params, paths, processes))
        memory = {name: memory_mib(pid) for name, pid in processes.items()
                  if name in KEFU_PROCESSES}
        stats = fetch_json(upstream_url.removesuffix("/v1") + "/stats")
        upstream = {"base_url": upstream_url, "stats": stats}
    finally:
        if stack is not None:
            stack.stop()
        stop_process(upstream_process)
    table = medians_by_concurrency(params, measured)
    report = build_report(params, started, loadavg_start, measured, table, upstream, memory)
    report["kefu_env"] = dict(kefu_env or {})
    open_rows = open_loop_rows(measured)
    report["open_loop"] = {f"{rate:g}": row for rate, row in open_rows.items()}
    report["open_loop_highest_rate"] = highest_rate_within(open_rows)
    report["idle_cpu_ms_per_s"] = idle
    markdown = render_markdown(report, table, open_rows)
    return markdown, write_results(results_dir, report, markdown), any(m.result.failed for m in measured)


def main(argv: Sequence[str] | None = None) -> None:
    params, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    with bench_work_dir("kefu-bench-", args.keep_logs) as work:
        kefu_env = dict(item.split("=", 1) for item in args.env)
        markdown, json_path, had_errors = run(params, work.path, args.results_dir, kefu_env)
        work.keep = work.keep or had_errors
    print(markdown, end="")
    log.info("wrote %s and %s in %.0f s", json_path, json_path.with_name("latest.md"), time.monotonic() - t0)


if __name__ == "__main__":
    main()
