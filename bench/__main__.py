"""`python -m bench` (`make bench`): kefu's /v1/chat against the direct path to the same fake upstream."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import platform
import secrets
import select
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.arrivals import ARRIVALS, Arrivals, highest_within
from bench.loadgen import LoadResult, LoadSpec, OpenLoopSpec, Target, format_summary, run_load, run_open_loop
from bench.processes import bench_work_dir
from devtools.devstack.stack import REPO_ROOT, Stack, StackConfig, StackPorts, free_port
from devtools.mint_token import mint
from gateway.settings import DEFAULT_SYSTEM_PROMPT

log = logging.getLogger("bench")

MODEL = "bench-model"
TENANT = "bench"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# A realistic customer-service answer (76 characters) with no lexicon word in it, so output
# moderation scans it in full and lets all of it through.
REPLY = ("您好！您的订单已于今天上午发货，预计两到三天送达。"
         "物流单号可以在“我的订单”页面查看；"
         "如果还有其他问题，请随时联系我们，祝您购物愉快。")
PATHS = ("direct", "kefu")
TIMINGS = ("ttft_p50", "ttft_p95", "ttft_p99", "total_p50", "total_p95", "total_p99")
FIGURES = (*TIMINGS, "throughput_rps")
KEFU_PROCESSES = ("gateway", "session", "moderation", "llm_worker", "nats")
WITHIN_MS = 50.0
IDLE_S = 5.0
"""Before the open loop, the processes' CPU with nothing sent is read for this long."""
"""Open loop: a rate passes while kefu's TTFT p99 is at most this much above the direct path's."""


@dataclass(frozen=True, slots=True)
class BenchParams:
    concurrency: tuple[int, ...] = (10, 100)
    requests_per_user: int = 10
    rounds: int = 3
    warmup: int = 20
    """Requests per path before the first measured round (not reported)."""
    ttft_ms: float = 50.0
    chunks: int = 20
    interval_ms: float = 10.0
    timeout_s: float = 60.0
    reply: str = REPLY
    rates: tuple[float, ...] = (10.0, 20.0, 40.0, 60.0, 80.0)
    """Open loop: arrival rates (requests/s), each run on both paths after the closed-loop rounds."""
    open_s: float = 5.0
    """Open loop: seconds of arrivals per rate and path."""
    arrivals: Arrivals = "even"

    def __post_init__(self) -> None:
        if not self.concurrency and not self.rates:
            raise ValueError("--concurrency and --rates are both empty: nothing to measure")
        if self.concurrency and min(self.concurrency) < 1:
            raise ValueError(f"--concurrency needs positive integers, got {self.concurrency}")
        if self.rates and min(self.rates) <= 0:
            raise ValueError(f"--rates needs positive numbers, got {self.rates}")
        if not self.open_s > 0 or self.arrivals not in ARRIVALS:
            raise ValueError(f"--open-s must be > 0 and --arrivals one of {ARRIVALS}")
        for name in ("requests_per_user", "rounds", "chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.warmup < 0 or self.ttft_ms < 0 or self.interval_ms < 0:
            raise ValueError("--warmup, --ttft-ms and --interval-ms must be >= 0")


QUICK = BenchParams(requests_per_user=2, rounds=1, warmup=10, rates=(10.0, 40.0), open_s=3.0)


@dataclass(frozen=True, slots=True)
class Measured:
    """One measured run and the CPU each process spent on it."""

    path: str
    round: int
    result: LoadResult
    cpu_ms_per_request: dict[str, float]


Processes = dict[str, int]
"""The pids whose CPU time and memory the report shows, by name."""


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


# ---------------------------------------------------------------- processes


def start_upstream(params: BenchParams, log_path: Path, timeout_s: float = 20.0,
                   ) -> tuple[subprocess.Popen[bytes], str]:
    """Start the fake upstream as its own process, off the load generator's loop; return it and its URL."""
    argv = [sys.executable, "-m", "devtools.fake_upstream", "--port", "0", "--ttft-ms", str(params.ttft_ms),
            "--chunks", str(params.chunks), "--interval-ms", str(params.interval_ms),
            "--reply", params.reply, "--model", MODEL]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log_file,
                                   start_new_session=True)
    try:
        line = _first_line(process, timeout_s)
    except BaseException:
        stop_process(process)
        raise
    return process, line.split()[-1]  # "fake upstream listening on <base_url>"


def _first_line(process: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"the fake upstream printed no address within {timeout_s:g} s")
    line = process.stdout.readline().decode()
    if not line:
        raise RuntimeError(f"the fake upstream exited with code {process.wait()}")
    return line


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def start_stack(data_dir: Path, upstream_url: str, secret: str, extra_env: Mapping[str, str] | None = None) -> Stack:
    # A private copy of plugins/: the worker hot-reloads on any change there, and edits to the
    # checkout during a run would otherwise reload it mid-measurement.
    plugins = shutil.copytree(REPO_ROOT / "plugins", data_dir / "plugins",
                              ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        "KEFU_PLUGINS_DIR": str(plugins),
        "KEFU_OPENAI_BASE_URL": upstream_url,
        "KEFU_MODEL": MODEL,
        # Rate limits high enough never to refuse: the bench measures the turn, not the limiter.
        "KEFU_RATE_LIMIT_RPS": "100000",
        "KEFU_RATE_LIMIT_BURST": "100000",
        "KEFU_TENANT_RATE_LIMIT_RPS": "100000",
        "KEFU_VISITOR_MSG_RPS": "1000", "KEFU_VISITOR_MSG_BURST": "100000",
        # A bench's crowd comes from one or a few addresses (bench.security_bench turns the guard back on).
        "KEFU_CONN_GUARD": "false",
        # Every bench request opens a new conversation; the default 5 per visitor refused most of them.
        "KEFU_VISITOR_MAX_CONVERSATIONS": "1000",
        "KEFU_SHUTDOWN_GRACE_S": "2",
        "KEFU_EDGE_METRICS_PORT": str(free_port()),  # edge_metrics_url() reads it back
        **(extra_env or {}),
    }
    stack = Stack(StackConfig(data_dir=data_dir, jwt_secret=secret, ports=StackPorts.free(), env=env,
                              log_dir=data_dir / "logs"))
    stack.start()
    return stack


def edge_metrics_url(stack: Stack) -> str:
    """/metrics of the stack's (first) edge process: its own port, not the public one."""
    return f"http://127.0.0.1:{stack.config.env['KEFU_EDGE_METRICS_PORT']}/metrics"


def fetch_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)


# ---------------------------------------------------------------- /proc readings (Linux; empty elsewhere)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads; None when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> dict[str, float]:
    """Resident set now (`rss_mib`) and its peak (`peak_mib`)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    wanted = {"VmRSS:": "rss_mib", "VmHWM:": "peak_mib"}
    return {wanted[parts[0]]: round(int(parts[1]) / 1024, 1)
            for parts in (line.split() for line in lines) if parts and parts[0] in wanted}


def cpu_snapshot(processes: Processes) -> dict[str, float]:
    readings = {name: cpu_seconds(pid) for name, pid in processes.items()}
    return {name: value for name, value in readings.items() if value is not None}


# ---------------------------------------------------------------- targets


def targets(upstream_url: str, edge_url: str, secret: str) -> dict[str, Target]:
    """The same question both ways; every message is unique so no answer can come from a cache."""
    serial = itertools.count()

    def question(user: int, seq: int) -> str:
        return (f"您好，我是第 {user} 位顾客，这是我的第 {seq} 个问题"
                f"（#{next(serial)}）：我的订单什么时候发货？")

    def direct_body(user: int, seq: int) -> Mapping[str, object]:
        # kefu sends the system prompt plus the question; the direct client sends the same.
        return {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                             {"role": "user", "content": question(user, seq)}]}

    def kefu_body(user: int, seq: int) -> Mapping[str, object]:
        return {"message": question(user, seq), "stream": True}

    tokens: dict[int, str] = {}

    def kefu_headers(user: int) -> Mapping[str, str]:
        # One principal per virtual user, as real visitors are; minted once, outside the timed part.
        if user not in tokens:
            tokens[user] = mint(secret, tenant=TENANT, subject=f"bench-user-{user}", role="visitor",
                                ttl_s=6 * 3600)
        return {"Authorization": f"Bearer {tokens[user]}"}

    return {
        "direct": Target("direct", f"{upstream_url}/chat/completions", "openai", direct_body),
        "kefu": Target("kefu", f"{edge_url}/v1/chat", "kefu", kefu_body, kefu_headers),
    }


# ---------------------------------------------------------------- running


async def measure(target: Target, spec: LoadSpec | OpenLoopSpec, processes: Processes, round_: int) -> Measured:
    before = cpu_snapshot(processes)
    result = await (run_load(target, spec) if isinstance(spec, LoadSpec) else run_open_loop(target, spec))
    after = cpu_snapshot(processes)
    per_request = {name: round((after[name] - before[name]) * 1000 / max(result.requests, 1), 2)
                   for name in after if name in before}
    log.info("round %d %s", round_, format_summary(result))
    return Measured(target.name, round_, result, per_request)


async def warm_up(params: BenchParams, paths: Mapping[str, Target]) -> None:
    """Open connections, load tokenizers and fill caches before anything is measured."""
    if not params.warmup:
        return
    for target in paths.values():
        spec = LoadSpec(min(10, params.warmup), requests=params.warmup, timeout_s=params.timeout_s)
        result = await run_load(target, spec)
        log.info("warm-up %s", format_summary(result))
        if not result.succeeded:
            raise RuntimeError(f"every warm-up request to {target.name} failed: {result.errors}")


async def idle_cpu(processes: Processes, seconds: float = IDLE_S) -> dict[str, float]:
    """CPU ms per second each process spends with nothing sent (timers, heartbeats, watchers)."""
    before = cpu_snapshot(processes)
    await asyncio.sleep(seconds)
    after = cpu_snapshot(processes)
    return {name: round((after[name] - before[name]) * 1000 / seconds, 1) for name in after if name in before}


async def run_rounds(params: BenchParams, paths: Mapping[str, Target],
                     processes: Processes) -> tuple[list[Measured], dict[str, float]]:
    """The closed-loop rounds, then the open-loop rates; and the idle CPU measured between them."""
    await warm_up(params, paths)
    measured: list[Measured] = []
    for concurrency in params.concurrency:
        spec = LoadSpec(concurrency, requests=concurrency * params.requests_per_user,
                        timeout_s=params.timeout_s)
        for round_ in range(params.rounds):
            # Alternate which path goes first: a noisy neighbour then hurts both alike.
            order = PATHS if round_ % 2 == 0 else PATHS[::-1]
            for name in order:
                measured.append(await measure(paths[name], spec, processes, round_))
    idle = await idle_cpu(processes) if params.rates else {}
    for index, rate in enumerate(params.rates):
        # The same seed on both paths: identical arrivals, so only the path differs.
        open_spec = OpenLoopSpec(rate, duration_s=params.open_s, arrivals=params.arrivals, seed=index,
                                 timeout_s=params.timeout_s)
        order = PATHS if index % 2 == 0 else PATHS[::-1]
        for name in order:
            measured.append(await measure(paths[name], open_spec, processes, index))
    return measured, idle


# ---------------------------------------------------------------- figures


def figures(result: LoadResult) -> dict[str, float | None]:
    """Milliseconds for timings, requests/s for throughput."""
    out: dict[str, float | None] = {}
    for kind in ("ttft", "total"):
        summary = getattr(result, kind)
        for q in ("p50", "p95", "p99"):
            out[f"{kind}_{q}"] = None if summary is None else getattr(summary, q) * 1000
    out["throughput_rps"] = result.throughput_rps
    return out


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def combine(runs: Sequence[Measured]) -> dict[str, Any]:
    """Medians across rounds of every figure; counts summed."""
    per_round = [figures(m.result) for m in runs]
    errors: Counter[str] = Counter()
    for m in runs:
        errors.update(m.result.errors)
    cpu_names = sorted({name for m in runs for name in m.cpu_ms_per_request})
    return {
        **{key: _median([f[key] for f in per_round]) for key in FIGURES},
        "rounds": len(runs),
        "requests": sum(m.result.requests for m in runs),
        "failed": sum(m.result.failed for m in runs),
        "errors": dict(sorted(errors.items())),
        "cached": sum(m.result.cached for m in runs),
        "cpu_ms_per_request": {name: _median([m.cpu_ms_per_request.get(name) for m in runs])
                               for name in cpu_names},
    }


def overhead(direct: Mapping[str, Any], kefu: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """kefu minus direct (ms) for timings, kefu over direct for every figure."""
    diff = {k: None if direct[k] is None or kefu[k] is None else kefu[k] - direct[k] for k in TIMINGS}
    ratio = {k: None if not direct[k] or kefu[k] is None else kefu[k] / direct[k] for k in FIGURES}
    return {"diff_ms": diff, "ratio": ratio}


def medians_by_concurrency(params: BenchParams, measured: Sequence[Measured]) -> dict[int, dict[str, Any]]:
    table: dict[int, dict[str, Any]] = {}
    for concurrency in params.concurrency:
        paths = {p: combine([m for m in measured if m.result.offered_rate is None
                             and m.result.concurrency == concurrency and m.path == p]) for p in PATHS}
        table[concurrency] = {**paths, "overhead": overhead(paths["direct"], paths["kefu"])}
    return table


def open_loop_rows(measured: Sequence[Measured]) -> dict[float, dict[str, Any]]:
    """Per offered rate: each path's figures and CPU per turn, kefu's TTFT p99 over direct's, and the verdict."""
    rows: dict[float, dict[str, Any]] = {}
    for m in measured:
        r = m.result
        if r.offered_rate is None:
            continue
        rows.setdefault(r.offered_rate, {})[m.path] = {
            **figures(r), "requests": r.requests, "failed": r.failed, "errors": r.errors, "cached": r.cached,
            "max_in_flight": r.max_in_flight,
            "start_lag_p99_ms": None if r.start_lag is None else r.start_lag.p99 * 1000,
            "cpu_ms_per_request": m.cpu_ms_per_request}
    for row in rows.values():
        direct, kefu = row.get("direct"), row.get("kefu")
        diff = None
        if direct and kefu and direct["ttft_p99"] is not None and kefu["ttft_p99"] is not None:
            diff = kefu["ttft_p99"] - direct["ttft_p99"]
        row["ttft_p99_diff_ms"] = diff
        # A failure on either path disqualifies the rate: a failed request has no TTFT to count.
        row["within"] = (diff is not None and diff <= WITHIN_MS and direct is not None and kefu is not None
                         and not direct["failed"] and not kefu["failed"])
    return dict(sorted(rows.items()))


def highest_rate_within(rows: Mapping[float, Mapping[str, Any]]) -> float | None:
    return highest_within({rate: bool(row["within"]) for rate, row in rows.items()})


# ---------------------------------------------------------------- report


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def latency_table(table: Mapping[int, Mapping[str, Any]]) -> list[str]:
    lines = ["| users | path | requests | errors | TTFT p50 | TTFT p95 | TTFT p99 "
             "| total p50 | total p95 | total p99 | req/s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for concurrency, row in table.items():
        for path in PATHS:
            f = row[path]
            cells = [_cell(f[k], ".1f") for k in TIMINGS] + [_cell(f["throughput_rps"], ".1f")]
            lines.append(f"| {concurrency} | {path} | {f['requests']} | {f['failed']} | "
                         + " | ".join(cells) + " |")
        diff, ratio = row["overhead"]["diff_ms"], row["overhead"]["ratio"]
        lines.append(f"| {concurrency} | kefu − direct (ms) | | | "
                     + " | ".join(_cell(diff[k], "+.1f") for k in TIMINGS) + " | |")
        lines.append(f"| {concurrency} | kefu / direct | | | "
                     + " | ".join(_cell(ratio[k], ".2f") + "×" for k in FIGURES) + " |")
    return lines


def cpu_table(table: Mapping[int, Mapping[str, Any]]) -> list[str]:
    names = ["client", "upstream", *KEFU_PROCESSES]
    lines = ["| users | path | " + " | ".join(names) + " | kefu total |",
             "|---:|---|" + "---:|" * (len(names) + 1)]
    for concurrency, row in table.items():
        for path in PATHS:
            cpu = row[path]["cpu_ms_per_request"]
            kefu_total = sum(cpu.get(n) or 0.0 for n in KEFU_PROCESSES)
            total_cell = _cell(kefu_total, ".2f") if path == "kefu" else "–"
            lines.append(f"| {concurrency} | {path} | "
                         + " | ".join(_cell(cpu.get(n), ".2f") for n in names) + f" | {total_cell} |")
    return lines


def memory_table(memory: Mapping[str, Mapping[str, float]]) -> list[str]:
    lines = ["| process | RSS after (MiB) | peak RSS (MiB) |", "|---|---:|---:|"]
    for name, m in memory.items():
        lines.append(f"| {name} | {_cell(m.get('rss_mib'), '.1f')} | {_cell(m.get('peak_mib'), '.1f')} |")
    return lines


def error_lines(table: Mapping[int, Mapping[str, Any]]) -> list[str]:
    lines = [f"- {concurrency} users, {path}: {json.dumps(row[path]['errors'], ensure_ascii=False)}"
             for concurrency, row in table.items() for path in PATHS if row[path]["errors"]]
    return ["", "Errors (all rounds):", *lines] if lines else []


def open_loop_lines(report: Mapping[str, Any], rows: Mapping[float, Mapping[str, Any]]) -> list[str]:
    if not rows:
        return []
    p = report["parameters"]
    lines = ["", "## Open loop", "",
             f"{p['arrivals'].capitalize()} arrivals for {p['open_s']:g} s per rate and path (the same schedule on "
             f"both paths, which goes first alternating by rate); a request starts on schedule whether or not "
             f"earlier ones have ended, so queueing shows in the times instead of slowing the arrivals. "
             f"`in flight`: the most requests open at once; `lag p99`: how late the client itself started "
             f"them. Times in ms.", "",
             "| rate/s | path | requests | errors | in flight | lag p99 | TTFT p50 | TTFT p99 | total p99 "
             "| req/s | TTFT p99 kefu − direct |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rate, row in rows.items():
        for path in PATHS:
            f = row.get(path)
            if not f:
                continue
            verdict = ""
            if path == "kefu":
                verdict = _cell(row["ttft_p99_diff_ms"], "+.1f") + (" (within)" if row["within"] else " (over)")
            lines.append(f"| {rate:g} | {path} | {f['requests']} | {f['failed']} | {f['max_in_flight']} | "
                         f"{_cell(f['start_lag_p99_ms'], '.1f')} | {_cell(f['ttft_p50'], '.1f')} | "
                         f"{_cell(f['ttft_p99'], '.1f')} | {_cell(f['total_p99'], '.1f')} | "
                         f"{_cell(f['throughput_rps'], '.1f')} | {verdict} |")
    names = ["client", "upstream", *KEFU_PROCESSES]
    lines += ["", "CPU ms per turn, open loop (all of each process's CPU during the rate's run, over its requests):",
              "", "| rate/s | path | " + " | ".join(names) + " | kefu total |",
              "|---:|---|" + "---:|" * (len(names) + 1)]
    for rate, row in rows.items():
        for path in PATHS:
            if path not in row:
                continue
            cpu = row[path]["cpu_ms_per_request"]
            total = _cell(sum(cpu.get(n) or 0.0 for n in KEFU_PROCESSES), ".2f") if path == "kefu" else "–"
            lines.append(f"| {rate:g} | {path} | " + " | ".join(_cell(cpu.get(n), ".2f") for n in names)
                         + f" | {total} |")
    idle = report.get("idle_cpu_ms_per_s") or {}
    if idle:
        kefu_idle = sum(idle.get(n) or 0.0 for n in KEFU_PROCESSES)
        lines += ["", f"With nothing sent ({IDLE_S:g} s before the first rate), CPU ms per second: "
                      + ", ".join(f"{n} {v:g}" for n, v in idle.items())
                      + f" (kefu {kefu_idle:.1f}); at R requests/s that adds {kefu_idle:.1f}/R ms to kefu's "
                        f"figure per turn above, the part that is not the turns' own."]
    best = report.get("open_loop_highest_rate")
    lines += ["", f"Highest arrival rate with kefu's TTFT p99 within {WITHIN_MS:g} ms of the direct path's (no "
                  f"failure on either path, and every lower rate measured within too): "
                  f"**{f'{best:g} requests/s' if best is not None else 'none'}** of "
                  + ", ".join(f"{r:g}" for r in rows) + "."]
    for rate, row in rows.items():
        for path in PATHS:
            if row.get(path, {}).get("errors"):
                lines.append(f"- {rate:g}/s, {path}: {json.dumps(row[path]['errors'], ensure_ascii=False)}")
    return lines


def render_markdown(report: Mapping[str, Any], table: Mapping[int, Mapping[str, Any]],
                    open_rows: Mapping[float, Mapping[str, Any]] | None = None) -> str:
    p, machine = report["parameters"], report["machine"]
    head = [
        f"# kefu bench, {report['timestamp']}",
        "",
        f"{machine['cpu_count']} CPUs, Python {machine['python']}, load average "
        f"{machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end. "
        f"Upstream: TTFT {p['ttft_ms']:g} ms, {p['chunks']} chunks {p['interval_ms']:g} ms apart. "
        + (f"{p['rounds']} round(s) × {p['requests_per_user']} request(s) per user per path, "
           f"paths alternating; figures are medians of the rounds, times in ms." if p["concurrency"] else "")
        + (f" kefu's settings: {', '.join(f'{k}={v}' for k, v in report['kefu_env'].items())}."
           if report.get("kefu_env") else ""),
        "",
    ]
    upstream = report["upstream"]["stats"]
    closed = [*latency_table(table), "", "CPU per request (ms; `client` is the load generator itself):", "",
              *cpu_table(table)] if table else ["No closed-loop rounds (`--concurrency ''`)."]
    tail = [
        *open_loop_lines(report, open_rows or {}),
        "", "Memory of the kefu processes after the run:", "", *memory_table(report["memory"]),
        "", f"The upstream answered {upstream.get('requests_total')} requests (warm-up included), "
            f"{upstream.get('cancelled')} cancelled, at most {upstream.get('max_in_flight')} at once.",
        *error_lines(table),
    ]
    return "\n".join([*head, *closed, *tail]) + "\n"


def _write(path: Path, text: str) -> None:
    """Write through a temporary file (git-ignored) so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(results_dir: Path, report: Mapping[str, Any], markdown: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{report['timestamp']}.json"
    _write(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _write(results_dir / "latest.md", markdown)
    return json_path


def build_report(params: BenchParams, started: datetime, loadavg_start: tuple[float, ...],
                 measured: Sequence[Measured], table: Mapping[int, Mapping[str, Any]],
                 upstream: Mapping[str, Any], memory: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_start": loadavg_start,
                    "loadavg_end": os.getloadavg()},
        "parameters": asdict(params),
        "upstream": upstream,
        "medians": {str(c): row for c, row in table.items()},
        "rounds": [{"path": m.path, "round": m.round, "cpu_ms_per_request": m.cpu_ms_per_request,
                    **m.result.to_dict()} for m in measured],
        "memory": memory,
    }


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
        processes: Processes = {"client": os.getpid(), "upstream": upstream_process.pid,
                                **{name: p.pid for name, p in stack.processes.items()}}
        if stack.nats is not None:
            processes["nats"] = stack.nats.process.pid
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
