"""The edge bench's figures (medians and spreads over rounds), its tables and markdown."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from bench.edge_load import Load
from bench.edge_params import PATHS
from bench.loadgen import median_of
from bench.results_io import cell

RATE_PROCESSES = ("client", "upstream", "gateway", "moderation", "llm_worker", "session", "nats")
KEFU_PROCESSES = ("gateway", "moderation", "llm_worker", "session", "nats")


def _ms(summary: Any, q: str) -> float | None:
    return None if summary is None else getattr(summary, q) * 1000


def combine(load: Load) -> dict[str, Any]:
    """Medians over the rounds; the spread of throughput and p99; counts summed."""
    per = [{"ttft_p50": _ms(r.result.ttft, "p50"), "ttft_p99": _ms(r.result.ttft, "p99"),
            "total_p50": _ms(r.result.total, "p50"), "total_p99": _ms(r.result.total, "p99"),
            "throughput_rps": r.result.throughput_rps} for r in load.rounds]
    errors: Counter[str] = Counter()
    for r in load.rounds:
        errors.update(r.result.errors)
    names = sorted({n for r in load.rounds for n in r.cpu_ms_per_request})
    percent_names = sorted({n for r in load.rounds for n in r.cpu_percent})

    def spread(key: str) -> list[float]:
        values = [v for f in per if (v := f[key]) is not None]
        return [min(values), max(values)] if values else []
    return {
        **{key: median_of([f[key] for f in per]) for key in per[0]},
        "spread": {key: spread(key) for key in per[0]},
        "requests_per_user": load.requests_per_user,
        "connect_s": load.connect_s,
        "requests": sum(r.result.requests for r in load.rounds),
        "failed": sum(r.result.failed for r in load.rounds),
        "errors": dict(sorted(errors.items())),
        "cpu_ms_per_request": {n: median_of([r.cpu_ms_per_request.get(n) for r in load.rounds]) for n in names},
        "cpu_percent": {n: median_of([r.cpu_percent.get(n) for r in load.rounds]) for n in percent_names},
    }


def rate_table(medians: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[str]:
    """Medians over the rounds; `headline p99 min–max` spreads the figure the mode is about
    (json: latency p99, stream: TTFT p99) over the rounds, as `req/s min–max` does throughput."""
    lines = ["| mode | users | path | req/user | requests | errors | TTFT p50 | TTFT p99 | latency p50 "
             "| latency p99 | headline p99 min–max | req/s | req/s min–max | client CPU | others' CPU |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, by_users in medians.items():
        headline = "ttft_p99" if mode == "stream" else "total_p99"
        for users, row in by_users.items():
            for path in PATHS:
                f = row[path]
                p99_low, p99_high = f["spread"][headline] or (None, None)
                rps_low, rps_high = f["spread"]["throughput_rps"] or (None, None)
                lines.append(
                    f"| {mode} | {users} | {path} | {f['requests_per_user']} | {f['requests']} | {f['failed']} "
                    f"| {cell(f['ttft_p50'], '.0f')} | {cell(f['ttft_p99'], '.0f')} | {cell(f['total_p50'], '.0f')} "
                    f"| {cell(f['total_p99'], '.0f')} | {cell(p99_low, '.0f')}–{cell(p99_high, '.0f')} "
                    f"| {cell(f['throughput_rps'], '.1f')} | {cell(rps_low, '.0f')}–{cell(rps_high, '.0f')} "
                    f"| {cell(f['cpu_percent'].get('client'), '.0f')} % "
                    f"| {cell(f['cpu_percent'].get('others'), '.0f')} % |")
            r = {key: _ratio(row["direct"][key], row["kefu"][key])
                 for key in ("ttft_p50", "ttft_p99", "total_p50", "total_p99", "throughput_rps")}
            lines.append(f"| {mode} | {users} | kefu / direct | | | | {r['ttft_p50']} | {r['ttft_p99']} "
                         f"| {r['total_p50']} | {r['total_p99']} | | {r['throughput_rps']} | | | |")
    return lines


def _ratio(direct: float | None, kefu: float | None) -> str:
    return "–" if not direct or kefu is None else f"{kefu / direct:.2f}×"


def cpu_table(medians: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[str]:
    lines = ["| mode | users | path | " + " | ".join(RATE_PROCESSES) + " | kefu total |",
             "|---|---:|---|" + "---:|" * (len(RATE_PROCESSES) + 1)]
    for mode, by_users in medians.items():
        for users, row in by_users.items():
            for path in PATHS:
                cpu = row[path]["cpu_ms_per_request"]
                total = sum(cpu.get(n) or 0.0 for n in KEFU_PROCESSES)
                lines.append(f"| {mode} | {users} | {path} | "
                             + " | ".join(cell(cpu.get(n), ".2f") for n in RATE_PROCESSES)
                             + f" | {cell(total, '.2f') if path == 'kefu' else '–'} |")
    return lines


def open_streams_tables(result: Mapping[str, Any]) -> list[str]:
    names = ("gateway", "llm_worker", "moderation", "upstream", "client")
    per_stream_of = ("gateway", "llm_worker", "moderation")
    head = ("| streams | open | failed | ramp s | opened/s | first chunk p50 / p99 ms | "
            + " | ".join(f"{n} RSS MiB" for n in names)
            + " | KiB/stream gw / worker / mod | gateway fds | edge / worker gauge | upstream in flight "
              "| CPU % gw / worker / mod |")
    lines = [head, "|" + "---:|" * (len(names) + 11)]
    base = result["baseline"]["memory"]
    for sample in [result["baseline"], *result["levels"]]:
        memory, gauges, cpu = sample["memory"], sample["gauges"], sample["cpu_percent"]
        failed = sample.get("failed_to_open", 0) + sample.get("ended_early", 0)
        first = sample.get("first_chunk_ms") or {}
        lines.append(
            f"| {sample['streams']} | {sample.get('open', 0)} | "
            f"{failed} | {cell(sample.get('ramp_s'), '.0f')} | "
            f"{cell(sample.get('open_rate_per_s'), '.0f')} | {cell(first.get('p50'), '.0f')} / "
            f"{cell(first.get('p99'), '.0f')} | "
            + " | ".join(cell(memory.get(n, {}).get("rss_mib"), ".0f") for n in names) + " | "
            + " / ".join(cell(_per_stream(memory, base, n, sample["streams"]), ".0f") for n in per_stream_of)
            + f" | {memory.get('gateway', {}).get('open_files', '–')} | "
              f"{_gauge(gauges.get('gateway'))} / {_gauge(gauges.get('llm_worker'))} | "
              f"{_gauge(gauges.get('upstream_in_flight'))} | "
              f"{cell(cpu.get('gateway'), '.0f')} / {cell(cpu.get('llm_worker'), '.0f')} / "
              f"{cell(cpu.get('moderation'), '.0f')} |")
    return lines


def _per_stream(memory: Mapping[str, Mapping[str, float]], idle: Mapping[str, Mapping[str, float]], name: str,
                streams: int) -> float | None:
    """KiB of RSS per open stream above the idle process."""
    rss, base = memory.get(name, {}).get("rss_mib"), idle.get(name, {}).get("rss_mib")
    if not streams or rss is None or base is None:
        return None
    return (rss - base) * 1024 / streams


def _gauge(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    p, machine = report["parameters"], report["machine"]
    lines = [f"# kefu edge bench, {report['timestamp']}", "",
             f"{machine['cpu_count']} CPUs, Python {machine['python']}, load average {machine['loadavg_start'][0]:.2f} "
             f"at start, {machine['loadavg_end'][0]:.2f} at end; open files limit of this process "
             f"{machine['open_files_limit']}."]
    rates = report.get("rates")
    if rates:
        lines += ["", "## /v1/chat/completions: direct vs kefu", "",
                  f"Upstream: TTFT {p['ttft_ms']:g} ms, {p['chunks']} chunks {p['interval_ms']:g} ms apart. "
                  f"Closed loop on connections opened beforehand; {p['rounds']} round(s) per row, paths "
                  f"alternating; in a round each user sends `req/user` requests (throughput: the round's "
                  f"answers over its wall time). Figures are medians over the rounds, times in ms (latency: to "
                  f"the whole JSON answer, or to `[DONE]`). `client CPU` is the load generator in % of one core "
                  f"(one Python process: near 100 % it is the bottleneck); `others' CPU` is what the rest of the "
                  f"shared machine used meanwhile, in % of one core (of {machine['cpu_count'] * 100} %).", "",
                  *rate_table(rates["medians"]),
                  "", "CPU per request (ms):", "", *cpu_table(rates["medians"])]
        errors = [f"- {mode} c={users} {path}: {json.dumps(f['errors'])}"
                  for mode, by_users in rates["medians"].items() for users, row in by_users.items()
                  for path, f in ((n, row[n]) for n in PATHS) if f["errors"]]
        lines += ["", "Errors (all rounds):", "", *errors] if errors else []
    streams = report.get("open_streams")
    if streams:
        lines += ["", "## Open streams held by one edge process", "",
                  f"Slow upstream: a chunk every {streams['upstream']['chunk_interval_ms'] / 1000:g} s, "
                  f"{streams['upstream']['chunks']} chunks ({streams['stream_seconds']:g} s a stream); opened at most "
                  f"{streams['parallel']} at a time; a stream is open when its client got the first chunk. "
                  f"RSS in MiB (VmRSS); gateway KiB/stream = (RSS − idle RSS) / streams; CPU in % of one core "
                  f"while holding the level. Open files limit: {json.dumps(streams['open_files_limit'])}.", "",
                  *open_streams_tables(streams), "",
                  f"Highest level held: **{streams['highest_level_held']}** streams. "
                  + (f"What broke: {streams['broke']}" if streams["broke"] else "Nothing broke."),
                  f"After hanging up: gauges {json.dumps(streams['close']['gauges'])} after "
                  f"{streams['close']['seconds_to_zero']:g} s; gateway RSS "
                  f"{streams['close']['memory_after'].get('gateway', {}).get('rss_mib', '–')} MiB."]
    for phase in ("rates", "open_streams"):
        problems = (report.get(phase) or {}).get("problems_in_logs") or {}
        if problems:
            lines += ["", f"Warnings and errors in the process logs ({phase}):", ""]
            for name, entries in problems.items():
                lines += [f"- {name}:"] + [f"  - `{e}`" for e in entries]
    return "\n".join(lines) + "\n"


def had_errors(report: Mapping[str, Any]) -> bool:
    rates = report.get("rates") or {}
    failed = any(r["failed"] for r in rates.get("rounds", []))
    streams = report.get("open_streams") or {}
    return failed or bool(streams.get("broke")) or bool(rates.get("problems_in_logs")) \
        or bool(streams.get("problems_in_logs"))
