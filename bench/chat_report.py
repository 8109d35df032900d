"""The main bench's figures (medians of rounds, open-loop rows, the verdict), its markdown and result files."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.arrivals import highest_within
from bench.chat_params import BenchParams
from bench.loadgen import LoadResult, median_of
from bench.results_io import cell, machine, write_atomic

PATHS = ("direct", "kefu")
TIMINGS = ("ttft_p50", "ttft_p95", "ttft_p99", "total_p50", "total_p95", "total_p99")
FIGURES = (*TIMINGS, "throughput_rps")
KEFU_PROCESSES = ("gateway", "session", "moderation", "llm_worker", "nats")
WITHIN_MS = 50.0
"""Open loop: a rate passes while kefu's TTFT p99 is at most this much above the direct path's."""
IDLE_S = 5.0
"""Before the open loop, the processes' CPU with nothing sent is read for this long."""


@dataclass(frozen=True, slots=True)
class Measured:
    """One measured run and the CPU each process spent on it."""

    path: str
    round: int
    result: LoadResult
    cpu_ms_per_request: dict[str, float]


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


def combine(runs: Sequence[Measured]) -> dict[str, Any]:
    """Medians across rounds of every figure; counts summed."""
    per_round = [figures(m.result) for m in runs]
    errors: Counter[str] = Counter()
    for m in runs:
        errors.update(m.result.errors)
    cpu_names = sorted({name for m in runs for name in m.cpu_ms_per_request})
    return {
        **{key: median_of([f[key] for f in per_round]) for key in FIGURES},
        "rounds": len(runs),
        "requests": sum(m.result.requests for m in runs),
        "failed": sum(m.result.failed for m in runs),
        "errors": dict(sorted(errors.items())),
        "cached": sum(m.result.cached for m in runs),
        "cpu_ms_per_request": {name: median_of([m.cpu_ms_per_request.get(name) for m in runs])
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


def latency_table(table: Mapping[int, Mapping[str, Any]]) -> list[str]:
    lines = ["| users | path | requests | errors | TTFT p50 | TTFT p95 | TTFT p99 "
             "| total p50 | total p95 | total p99 | req/s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for concurrency, row in table.items():
        for path in PATHS:
            f = row[path]
            cells = [cell(f[k], ".1f") for k in TIMINGS] + [cell(f["throughput_rps"], ".1f")]
            lines.append(f"| {concurrency} | {path} | {f['requests']} | {f['failed']} | "
                         + " | ".join(cells) + " |")
        diff, ratio = row["overhead"]["diff_ms"], row["overhead"]["ratio"]
        lines.append(f"| {concurrency} | kefu − direct (ms) | | | "
                     + " | ".join(cell(diff[k], "+.1f") for k in TIMINGS) + " | |")
        lines.append(f"| {concurrency} | kefu / direct | | | "
                     + " | ".join(cell(ratio[k], ".2f") + "×" for k in FIGURES) + " |")
    return lines


def cpu_table(table: Mapping[int, Mapping[str, Any]]) -> list[str]:
    names = ["client", "upstream", *KEFU_PROCESSES]
    lines = ["| users | path | " + " | ".join(names) + " | kefu total |",
             "|---:|---|" + "---:|" * (len(names) + 1)]
    for concurrency, row in table.items():
        for path in PATHS:
            cpu = row[path]["cpu_ms_per_request"]
            kefu_total = sum(cpu.get(n) or 0.0 for n in KEFU_PROCESSES)
            total_cell = cell(kefu_total, ".2f") if path == "kefu" else "–"
            lines.append(f"| {concurrency} | {path} | "
                         + " | ".join(cell(cpu.get(n), ".2f") for n in names) + f" | {total_cell} |")
    return lines


def memory_table(memory: Mapping[str, Mapping[str, float]]) -> list[str]:
    lines = ["| process | RSS after (MiB) | peak RSS (MiB) |", "|---|---:|---:|"]
    for name, m in memory.items():
        lines.append(f"| {name} | {cell(m.get('rss_mib'), '.1f')} | {cell(m.get('peak_mib'), '.1f')} |")
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
                verdict = cell(row["ttft_p99_diff_ms"], "+.1f") + (" (within)" if row["within"] else " (over)")
            lines.append(f"| {rate:g} | {path} | {f['requests']} | {f['failed']} | {f['max_in_flight']} | "
                         f"{cell(f['start_lag_p99_ms'], '.1f')} | {cell(f['ttft_p50'], '.1f')} | "
                         f"{cell(f['ttft_p99'], '.1f')} | {cell(f['total_p99'], '.1f')} | "
                         f"{cell(f['throughput_rps'], '.1f')} | {verdict} |")
    names = ["client", "upstream", *KEFU_PROCESSES]
    lines += ["", "CPU ms per turn, open loop (all of each process's CPU during the rate's run, over its requests):",
              "", "| rate/s | path | " + " | ".join(names) + " | kefu total |",
              "|---:|---|" + "---:|" * (len(names) + 1)]
    for rate, row in rows.items():
        for path in PATHS:
            if path not in row:
                continue
            cpu = row[path]["cpu_ms_per_request"]
            total = cell(sum(cpu.get(n) or 0.0 for n in KEFU_PROCESSES), ".2f") if path == "kefu" else "–"
            lines.append(f"| {rate:g} | {path} | " + " | ".join(cell(cpu.get(n), ".2f") for n in names)
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


def write_results(results_dir: Path, report: Mapping[str, Any], markdown: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{report['timestamp']}.json"
    write_atomic(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(results_dir / "latest.md", markdown)
    return json_path


def build_report(params: BenchParams, started: datetime, loadavg_start: tuple[float, ...],
                 measured: Sequence[Measured], table: Mapping[int, Mapping[str, Any]],
                 upstream: Mapping[str, Any], memory: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "machine": machine(loadavg_start),
        "parameters": asdict(params),
        "upstream": upstream,
        "medians": {str(c): row for c, row in table.items()},
        "rounds": [{"path": m.path, "round": m.round, "cpu_ms_per_request": m.cpu_ms_per_request,
                    **m.result.to_dict()} for m in measured],
        "memory": memory,
    }
