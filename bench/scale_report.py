"""The scale bench's markdown: the empty store against the full one, and the live-socket table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def socket_lines(live: Mapping[str, Any]) -> list[str]:
    lines = [f"Sockets: {live['opened']:,} of {live['sockets']:,} opened ({live['failed']} failed) on "
             f"{live['edges']} edge process(es) from {live['source_addresses']} source addresses in "
             f"{live['open_s']} s, {live['in_conversation']:,} in an open conversation; "
             f"{live['still_open_after_idle']:,} still open at the end",
             "idle CPU % of a core: " + ", ".join(f"{name} {value}" for name, value
                                                  in live["idle_cpu_percent_of_a_core"].items()),
             "RSS MiB: " + ", ".join(f"{name} {value}" for name, value in live["rss_mib"].items()),
             "PSS MiB (shared pages counted once): " + ", ".join(f"{name} {value}" for name, value
                                                                  in live.get("pss_mib", {}).items()),
             f"edge RSS per socket: {live['edge_kib_per_socket']} KiB; consumers on KEFU_MESSAGES: "
             f"{live['log_consumers']}"]
    if (lat := live.get("latency")) and "error" in lat:
        lines.append(f"visitor-to-agent latency run failed: {lat['error']}")
    elif lat:
        ms = lat["latency_ms"] or {}
        lines.append(f"visitor-to-agent at {lat['offered_rate']:g} msg/s among them: p50 {ms.get('p50', 0):.1f} ms, "
                     f"p99 {ms.get('p99', 0):.1f} ms, max {ms.get('max', 0):.1f} ms; {lat['received']} of "
                     f"{lat['messages']} received, {lat['duplicates']} duplicates, problems {lat['problems']}")
    return lines


def _ratio(mine: float | None, theirs: float | None) -> str:
    return f"{mine / theirs:.2f}" if mine and theirs else "-"


def render(report: Mapping[str, Any]) -> str:
    empty, full = report["empty"], report["stored"]
    n = report["seed"]["conversations"]
    lines = [f"# make bench-scale, {report['started']} ({n:,} conversations stored)", "",
             f"Seeding: {n:,} conversations in {report['seed']['seconds']} s "
             f"({report['seed']['per_second']:,}/s, {report['seed']['procs']} processes); "
             f"load average (1, 5, 15 min) at the end of the empty phase {report['empty']['load_average']}, "
             f"of the stored phase {report['stored']['load_average']} ({report['cpus']} CPUs)", "",
             "| figure | empty store | stored | stored / empty |", "|---|---|---|---|"]
    for key in ("ttft_p50_ms", "ttft_p99_ms", "total_p99_ms"):
        lines.append(f"| turn {key} | {empty['turns'][key]} | {full['turns'][key]} | "
                     f"{_ratio(full['turns'][key], empty['turns'][key])} |")
    for name, value in empty["turns"]["cpu_ms_per_turn"].items():
        mine = full["turns"]["cpu_ms_per_turn"].get(name)
        lines.append(f"| turn CPU ms, {name} | {value} | {mine} | {_ratio(mine, value)} |")
    for status, value in empty["lists"].items():
        mine = full["lists"][status]
        lines.append(f"| GET /v1/conversations {status}: p50 / p99 ms (listed) | {value['p50_ms']} / "
                     f"{value['p99_ms']} ({value['listed']}) | {mine['p50_ms']} / {mine['p99_ms']} "
                     f"({mine['listed']}) | {_ratio(mine['p99_ms'], value['p99_ms'])} |")
    for name, value in empty["idle_cpu_percent_of_a_core"].items():
        mine = full["idle_cpu_percent_of_a_core"].get(name)
        lines.append(f"| idle CPU % of a core, {name} | {value} | {mine} | {_ratio(mine, value)} |")
    for name, value in empty["rss_mib"].items():
        mine = full["rss_mib"].get(name)
        lines.append(f"| RSS MiB, {name} | {value} | {mine} | {_ratio(mine, value)} |")
    lines += ["", "Ready after a restart (s), each process alone: "
              + ", ".join(f"{name} {seconds}" for name, seconds in report["ready_after_restart_s"].items())]
    if nats := report.get("nats_server_restart"):
        lines.append(f"nats-server: stopped in {nats['stop_s']} s; its start took {nats['start_cpu_s']} s of CPU, "
                     f"RSS {nats['start_rss_mib']} MiB when ready")
    failed = empty["turns"]["failed"] + full["turns"]["failed"]
    lines.append(f"Failed turns: {failed}")
    if live := report.get("sockets"):
        lines += ["", *socket_lines(live)]
    return "\n".join(lines) + "\n"
