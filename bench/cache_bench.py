"""`python -m bench.cache_bench`: the answer cache and pre-generation under a Zipf-like FAQ question stream.

One fake upstream (its own process, TTFT 1.2 s) serves the whole run. The direct path (the
client straight to the upstream) is measured first, for reference. Then, for each mode
(cache and pre-generation off; cache on; cache and pre-generation on; the same with the
visitors split over two tenants), a fresh kefu stack replays the same seeded visitor stream:
each visitor opens a session and asks 1-3 questions in it, reading each answer for a while
before the next. The generator is described in bench/README.md ("Cache and pre-generation").

Results: a markdown table on stdout and bench/results/cache-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import platform
import re
import secrets
import shutil
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.cache_load import Principals, run_stream, warm_up
from bench.cache_report import cache_figures, cell, median_rounds, ms_stats, pct, render_markdown, turn_figures
from bench.cache_workload import (
    PRIOR_INDEX_OFFSET,
    TENANTS,
    Visitor,
    WorkloadBuilder,
    WorkloadSpec,
    load_faq,
    load_knowledge_base,
    predicted_cacheable,
    workload_stats,
)
from bench.chat_params import MODEL, BenchParams
from bench.chat_stack import fetch_json, start_stack, start_upstream
from bench.loadgen import LoadSpec, Target, run_load
from bench.proc_stats import cpu_snapshot, stack_pids
from bench.processes import bench_work_dir, stop_process
from bench.results_io import RESULTS_DIR, write_atomic
from bench.stack_logs import log_problems
from devtools.devstack.stack import REPO_ROOT, Stack
from gateway.settings import DEFAULT_SYSTEM_PROMPT

log = logging.getLogger("bench.cache")


# ---------------------------------------------------------------- stacks, metrics, upstream


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    cache: bool
    pregen: bool
    tenants: int = 1


MODES = {
    "off": Mode("off", cache=False, pregen=False),
    "cache": Mode("cache", cache=True, pregen=False),
    "cache+pregen": Mode("cache+pregen", cache=True, pregen=True),
    "2-tenants": Mode("cache+pregen, 2 tenants", cache=True, pregen=True, tenants=2),
}


def start_mode_stack(work_dir: Path, upstream_url: str, secret: str, mode: Mode,
                     worker_env: Mapping[str, str]) -> Stack:
    """The main bench's stack (bench/chat_stack.py) with the mode's cache switches, and plugins whose routes
    name the sample FAQ: the knowledge base then knows the tea shop's common questions for every tenant (the
    bundled routes answer each tenant from its own documents, and these tenants have none)."""
    # Its own folder: start_stack copies the bundled plugins to work_dir/plugins (unused here).
    plugins = shutil.copytree(REPO_ROOT / "plugins", work_dir / "faq-plugins",
                              ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    routes = plugins / "routes.toml"
    routes.write_text(routes.read_text().replace("settings]\n", 'settings]\nfaq_file = "shop_faq.json"\n'))
    return start_stack(work_dir, upstream_url, secret, {
        "KEFU_CACHE_ENABLED": "1" if mode.cache else "0",
        "KEFU_PREGEN_ENABLED": "1" if mode.pregen else "0",
        "KEFU_PLUGINS_DIR": str(plugins),
        **worker_env,
    })


def scrape(url: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, keyed `name{label=value,...}` (labels sorted)."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


PROBLEM = re.compile(r"Traceback|\bERROR\b|CRITICAL|\bWARNING\b|Exception", re.IGNORECASE)
"""What counts as a problem in this bench's logs (its stacks log at info level)."""


# ---------------------------------------------------------------- main


@dataclass(frozen=True, slots=True)
class CacheBenchParams:
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    modes: tuple[str, ...] = ("off", "cache", "cache+pregen", "2-tenants")
    concurrency: int = 20
    direct_requests: int = 100
    warmup: int = 4
    ttft_ms: float = 1200.0
    chunks: int = 20
    interval_ms: float = 10.0
    timeout_s: float = 60.0
    pregen_tokens_per_minute: int | None = None
    """KEFU_PREGEN_TOKENS_PER_MINUTE for the worker; None keeps its default."""
    pregen_concurrency: int | None = None
    """KEFU_PREGEN_CONCURRENCY for the worker; None keeps its default."""
    rounds: int = 1
    """Times every mode runs (alternating); the tables show medians."""
    prior_visitors: int = 0
    """Unmeasured earlier traffic, in the measured tenants, before the measured stream: visitors drawn
    like the stream's but with seed+1 (other questions from the same distribution). 0 measures a cold
    start; a few hundred measure a worker that has been serving for a while (steady state)."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"--modes takes a comma-separated subset of {list(MODES)}, got {list(self.modes)}")
        if self.concurrency < 1 or self.direct_requests < 0 or self.warmup < 0 or self.prior_visitors < 0 \
                or self.rounds < 1:
            raise ValueError("--concurrency must be >= 1, --direct-requests and --warmup >= 0")

    def worker_env(self) -> dict[str, str]:
        env = {}
        if self.pregen_tokens_per_minute is not None:
            env["KEFU_PREGEN_TOKENS_PER_MINUTE"] = str(self.pregen_tokens_per_minute)
        if self.pregen_concurrency is not None:
            env["KEFU_PREGEN_CONCURRENCY"] = str(self.pregen_concurrency)
        return env


QUICK = CacheBenchParams(workload=WorkloadSpec(visitors=30, think_s=(1.0, 2.0)),
                         modes=("off", "cache", "cache+pregen"), direct_requests=20, warmup=1)


def parse_args(argv: Sequence[str] | None) -> tuple[CacheBenchParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 visitors, 3 modes, reading 1-2 s: about a minute")
    parser.add_argument("--visitors", type=int, help="visitors in the stream (default 200)")
    parser.add_argument("--concurrency", type=int, help="visitors at a time (default 20)")
    parser.add_argument("--seed", type=int, help="seed of the question stream")
    parser.add_argument("--zipf-s", type=float, help="Zipf exponent over entries and phrasings (default 1.1)")
    parser.add_argument("--related-bias", type=float, help="chance the next question follows `related` (0.6)")
    parser.add_argument("--personal-share", type=float, help="share of questions about the visitor's order (0.1)")
    parser.add_argument("--free-share", type=float,
                        help="share of FAQ questions worded as the FAQ does not (held-out wordings; 0)")
    parser.add_argument("--novel-share", type=float, help="share of questions the FAQ does not cover (0)")
    parser.add_argument("--rounds", type=int, help="times every mode runs, alternating; medians reported (1)")
    parser.add_argument("--prior-visitors", type=int,
                        help="unmeasured earlier visitors (seed+1) in the measured tenants first: steady state (0)")
    parser.add_argument("--think-s", help="reading time between a visitor's questions, 'min,max' s (1.5,4)")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--direct-requests", type=int, help="requests on the direct path (default 100)")
    parser.add_argument("--warmup", type=int, help="unmeasured turns per stack, in a tenant of their own (4)")
    parser.add_argument("--ttft-ms", type=float, help="upstream time to first token (default 1200)")
    parser.add_argument("--chunks", type=int, help="upstream content chunks per answer (default 20)")
    parser.add_argument("--interval-ms", type=float, help="upstream delay between chunks (default 10)")
    parser.add_argument("--timeout-s", type=float, help="deadline of one request (default 60)")
    parser.add_argument("--pregen-tokens-per-minute", type=int, help="KEFU_PREGEN_TOKENS_PER_MINUTE for the worker")
    parser.add_argument("--pregen-concurrency", type=int, help="KEFU_PREGEN_CONCURRENCY for the worker")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary data and log folders")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else CacheBenchParams()
    try:
        workload_over: dict[str, Any] = {k: v for k, v in (
            ("visitors", args.visitors), ("seed", args.seed), ("zipf_s", args.zipf_s),
            ("related_bias", args.related_bias), ("personal_share", args.personal_share),
            ("free_share", args.free_share), ("novel_share", args.novel_share)) if v is not None}
        if args.think_s:
            low, high = (float(x) for x in args.think_s.split(","))
            workload_over["think_s"] = (low, high)
        over: dict[str, Any] = {k: getattr(args, k) for k in (
            "concurrency", "direct_requests", "warmup", "ttft_ms", "chunks", "interval_ms", "timeout_s",
            "pregen_tokens_per_minute", "pregen_concurrency", "prior_visitors", "rounds")
            if getattr(args, k) is not None}
        if args.modes:
            over["modes"] = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        return replace(base, workload=replace(base.workload, **workload_over), **over), args
    except ValueError as error:
        parser.error(str(error))


async def measure_direct(params: CacheBenchParams, upstream_url: str, visitors: Sequence[Visitor]) -> dict[str, Any]:
    """The same questions straight to the upstream, closed loop at the same concurrency, no reading pauses."""
    questions = itertools.cycle([q.text for v in visitors for q in v.questions])

    def body(user: int, seq: int) -> Mapping[str, Any]:
        return {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                             {"role": "user", "content": next(questions)}]}

    target = Target("direct", f"{upstream_url}/chat/completions", "openai", body)
    result = await run_load(target, LoadSpec(params.concurrency, requests=params.direct_requests,
                                             timeout_s=params.timeout_s))
    ttfts = [r.ttft_s for r in result.samples if r.ok and r.ttft_s is not None]
    return {"requests": result.requests, "failed": result.failed, "errors": result.errors,
            "ttft_ms": ms_stats(ttfts), "total_ms": ms_stats([r.total_s for r in result.samples if r.ok])}


def run_mode(params: CacheBenchParams, mode: Mode, work_dir: Path, upstream_url: str, secret: str,
             visitors: Sequence[Visitor], cacheable: Sequence[Sequence[bool]],
             prior: Sequence[Visitor] = (), prior_cacheable: Sequence[Sequence[bool]] = ()) -> dict[str, Any]:
    stats_url = upstream_url.removesuffix("/v1") + "/stats"
    t0 = time.monotonic()
    stack = start_mode_stack(work_dir, upstream_url, secret, mode, params.worker_env())
    log.info("%s: stack ready in %.1f s", mode.name, time.monotonic() - t0)
    metrics_url = f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics"
    principals = Principals(secret)
    try:
        asyncio.run(warm_up(stack.base_url, principals, params.warmup, params.timeout_s))
        prior_summary = None
        if prior:
            t0 = time.monotonic()
            prior_turns, _, _ = asyncio.run(run_stream(
                stack.base_url, prior, prior_cacheable, TENANTS[:mode.tenants], principals, params.concurrency,
                params.timeout_s, metrics_url))
            prior_summary = {"visitors": len(prior), "turns": len(prior_turns),
                             "failed": sum(1 for t in prior_turns if not t.ok),
                             "cached": sum(1 for t in prior_turns if t.ok and t.cached),
                             "duration_s": round(time.monotonic() - t0, 1)}
            log.info("%s: prior traffic %s", mode.name, prior_summary)
        pids = stack_pids(stack)
        before, upstream_before, cpu_before = scrape(metrics_url), fetch_json(stats_url), cpu_snapshot(pids)
        turns, duration, streams = asyncio.run(run_stream(
            stack.base_url, visitors, cacheable, TENANTS[:mode.tenants], principals, params.concurrency,
            params.timeout_s, metrics_url))
        after, upstream_after, cpu_after = scrape(metrics_url), fetch_json(stats_url), cpu_snapshot(pids)
    finally:
        t0 = time.monotonic()
        stack.stop()
        log.info("%s: stack stopped in %.1f s", mode.name, time.monotonic() - t0)
    figures = turn_figures(turns, duration)
    metrics = cache_figures(before, after)
    result = {
        "mode": asdict(mode),
        "prior": prior_summary,
        "figures": figures,
        "metrics": metrics,
        "upstream_calls": upstream_after["requests_total"] - upstream_before["requests_total"],
        "upstream_max_in_flight": upstream_after.get("max_in_flight"),
        "cpu_s": {name: round(cpu_after[name] - cpu_before[name], 2) for name in cpu_after if name in cpu_before},
        "live_streams": {"samples": len(streams), "max": max(streams, default=0.0),
                         "mean": sum(streams) / len(streams) if streams else 0.0,
                         # Pre-generation waits while the worker has this many live streams.
                         "share_at_or_over_8": sum(s >= 8 for s in streams) / len(streams) if streams else 0.0},
        "turns": [asdict(t) for t in turns],
    }
    log.info("%s: %d turns, %d failed, hit ratio %s, TTFT p50 %s p95 %s ms, %d upstream calls, %.0f s",
             mode.name, figures["turns"], figures["failed"], pct(figures["hit_ratio"]),
             cell(figures["ttft_ms"]["p50"]), cell(figures["ttft_ms"]["p95"]), result["upstream_calls"], duration)
    return result


def run(params: CacheBenchParams, work_dir: Path, results_dir: Path) -> tuple[str, Path, bool]:
    started, loadavg_start = datetime.now(UTC), os.getloadavg()
    secret = secrets.token_hex(32)
    plugins_dir = REPO_ROOT / "plugins"
    faq = load_faq(plugins_dir)
    visitors = WorkloadBuilder(faq, params.workload).build()
    knower = asyncio.run(load_knowledge_base(plugins_dir))
    cacheable = [predicted_cacheable(v, knower) for v in visitors]
    # Earlier traffic: other visitors of the same distribution, indices far from the measured ones (same
    # parity, so the same tenant split) so no principal is reused.
    prior = [replace(v, index=v.index + PRIOR_INDEX_OFFSET) for v in WorkloadBuilder(faq, replace(
        params.workload, seed=params.workload.seed + 1, visitors=max(1, params.prior_visitors))).build()
             ][:params.prior_visitors]
    prior_cacheable = [predicted_cacheable(v, knower) for v in prior]
    workload = {tenants: workload_stats(faq, visitors, cacheable, tenants, knower)
                for tenants in sorted({MODES[m].tenants for m in params.modes})}
    upstream_params = BenchParams(ttft_ms=params.ttft_ms, chunks=params.chunks, interval_ms=params.interval_ms)
    upstream, upstream_url = start_upstream(upstream_params, work_dir / "upstream.log")
    runs: list[dict[str, Any]] = []
    problems: dict[str, dict[str, list[str]]] = {}
    try:
        direct = asyncio.run(measure_direct(params, upstream_url, visitors))
        log.info("direct: %d requests, TTFT p50 %s p95 %s ms", direct["requests"],
                 cell(direct["ttft_ms"]["p50"]), cell(direct["ttft_ms"]["p95"]))
        # Rounds alternate the modes (off, cache, cache+pregen, off, ...), so a change in the machine's
        # load during the run hits every mode alike; the tables report each mode's median round.
        for round_ in range(1, params.rounds + 1):
            for name in params.modes:
                mode_dir = work_dir / f"r{round_}-{re.sub(r'[^a-z0-9]+', '-', name)}"
                mode_dir.mkdir(parents=True)
                try:
                    run = run_mode(params, MODES[name], mode_dir, upstream_url, secret, visitors, cacheable,
                                   prior, prior_cacheable)
                    runs.append({**run, "round": round_})
                finally:
                    found = log_problems(mode_dir / "logs", 8, PROBLEM) if (mode_dir / "logs").exists() else {}
                    if found:
                        problems[f"{name} round {round_}"] = found
    finally:
        stop_process(upstream)
    report = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_start": loadavg_start,
                    "loadavg_end": os.getloadavg()},
        "parameters": asdict(params),
        "workload": workload[1] if 1 in workload else next(iter(workload.values())),
        "workload_by_tenants": {str(k): v for k, v in workload.items()},
        "direct": direct,
        "rounds": runs,
        "modes": median_rounds(runs),
        "log_problems": problems,
    }
    markdown = render_markdown(report)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"cache-{report['timestamp']}.json"
    write_atomic(json_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    had_errors = bool(direct["failed"]) or any(r["figures"]["failed"] for r in runs)
    return markdown, json_path, had_errors


def main(argv: Sequence[str] | None = None) -> None:
    params, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    with bench_work_dir("kefu-cache-bench-", args.keep_logs) as work:
        markdown, json_path, had_errors = run(params, work.path, args.results_dir)
        work.keep = work.keep or had_errors
    print(markdown, end="")
    log.info("wrote %s in %.0f s", json_path, time.monotonic() - t0)


if __name__ == "__main__":
    main()
