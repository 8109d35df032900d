"""The live-chat bench's verdicts (highest rate within 50 ms), tables and markdown."""

from __future__ import annotations

import json
from typing import Any

from bench.arrivals import highest_within
from bench.results_io import cell
from bench.ws_params import RESUME_CASES


def _ratio(kefu: float | None, floor: float | None) -> str:
    return "–" if not kefu or not floor else f"{kefu / floor:.1f}×"


def _per_connect(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "–" if value is None or not row["opened"] else f"{value * 1000 / row['opened']:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    p, machine = report["parameters"], report["machine"]
    lines = [f"# kefu live-chat bench, {report['timestamp']}", "",
             f"{machine['cpu_count']} CPUs, Python {machine['python']}, load average "
             f"{machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end, "
             f"{machine['seconds']} s. Command: `{report['command']}`."]
    idle = report.get("idle")
    if idle:
        k, f = idle["kefu"], idle.get("floor") or {}
        lines += ["", "## Idle sockets on one edge process", "",
                  f"{p['client_processes']} client process(es), {p['connect_parallel']} handshakes in flight each; "
                  f"a socket counts once `welcome` arrived. Held {p['hold_s']:g} s with a server ping every "
                  f"{p['heartbeat_s']:g} s. KiB/socket = (VmRSS − VmRSS before) / sockets; `held` is after the hold.",
                  f"CPU ms/connect: CPU time spent while opening / sockets opened, by the server and by all "
                  f"client processes together; their sum against {machine['cpu_count']} cores × wall time says "
                  f"who was short of CPU.",
                  "", "| server | sockets | failed | open after hold | connect/s | handshake p50 / p99 ms "
                  "| CPU ms/connect server / clients | RSS before → held MiB | KiB/socket opened | KiB/socket held "
                  "| CPU % holding |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in (("kefu edge", k), ("aiohttp floor", f)):
            if not row:
                continue
            hs = row["connect_ms"] or {}
            lines.append(
                f"| {name} | {row['opened']} | {row['failed']} | {row['still_open_after_hold']} | "
                f"{cell(row['connect_rate'], '.0f')} | {cell(hs.get('p50'))} / {cell(hs.get('p99'))} | "
                f"{_per_connect(row, 'cpu_seconds_opening')} / {_per_connect(row, 'client_cpu_seconds_opening')} | "
                f"{cell(row['rss_mib']['before'])} → {cell(row['rss_mib']['held'])} | "
                f"{cell(row['kib_per_socket']['opened'])} | {cell(row['kib_per_socket']['held'])} | "
                f"{cell(row['cpu_percent_holding'], '.0f')} |")
        if f:
            lines.append(f"| kefu / floor | | | | {_ratio(k['connect_rate'], f['connect_rate'])} | | | | "
                         f"{_ratio(k['kib_per_socket']['opened'], f['kib_per_socket']['opened'])} | "
                         f"{_ratio(k['kib_per_socket']['held'], f['kib_per_socket']['held'])} | |")
        for row in (k, f):
            if row and row.get("capped"):
                lines += ["", f"Capped: {row['capped']}"]
            if row and row.get("errors"):
                lines += ["", f"Errors ({row['mode']}): {json.dumps(row['errors'], ensure_ascii=False)}"]
        for row in (k, f):
            if row and row["still_open_after_hold"] < row["opened"]:
                lines += ["", f"{row['mode']}: {row['opened'] - row['still_open_after_hold']} sockets were closed by "
                              f"the server before the end of the hold (close codes seen by the clients: "
                              f"{json.dumps(row['close_codes'])}); KiB/socket still divides by all opened."]
        held = k["kib_per_socket"]["held"]
        verdict = "met" if held is not None and held <= 32 and k["opened"] >= 10_000 else "NOT met"
        lines += ["", f"Target ≤ 32 KiB per idle socket at 10,000 sockets: **{verdict}** "
                      f"({cell(held)} KiB at {k['opened']} sockets)."]
    resume = report.get("resume")
    if resume:
        lines += ["", "## Resume", "",
                  f"Median of {p['resume_rounds']} rounds, ms from sending `hello {{resume}}` on a connected "
                  f"socket to the last missed event. cold: no other socket of the conversation on the edge; warm: "
                  f"another tab keeps its feed open; direct: one ListMessages call to the session service (what a "
                  f"cold feed reads before it follows the conversation's log). KEFU_WS_SEND_QUEUE: "
                  f"{p['send_queue'] if p['send_queue'] is not None else 'the edge default'}.", "",
                  "| missed events | sends | cold | warm | direct | cold / direct | cold min–max |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        failures = []
        for row in resume.values():
            if "events" not in row:
                continue
            cold = row.get("cold_ms") or []
            lines.append(f"| {row['events']} | {row['sends']} | {cell(row.get('cold_median_ms'))} | "
                         f"{cell(row.get('warm_median_ms'))} | {cell(row.get('direct_median_ms'))} | "
                         f"{_ratio(row.get('cold_median_ms'), row.get('direct_median_ms'))} | "
                         + (f"{min(cold):.1f}–{max(cold):.1f} |" if cold else "– |"))
            failures += [f"- {row['events']} events, {case}: {row[f'{case}_error']}"
                         for case in RESUME_CASES if f"{case}_error" in row]
        if failures:
            lines += ["", "Failed:", "", *failures]
        if "error" in resume:
            lines += ["", f"Resume phase failed: {resume['error']}"]
        biggest = resume.get("500")
        if biggest:
            medians = [biggest.get(f"{case}_median_ms") for case in ("cold", "warm")]
            ok = all(m is not None and m < 100 for m in medians)
            lines += ["", f"Target 500 missed events < 100 ms: **{'met' if ok else 'NOT met'}** "
                          f"(cold {cell(medians[0])} ms, warm {cell(medians[1])} ms)."]
    latency = report.get("latency")
    if latency:
        lines += ["", "## Visitor → agent latency", "",
                  f"{p['visitors']} visitors on one edge, {p['agents']} agents on another edge process; "
                  f"{p['rate']:g} messages/s in total, open loop, {p['duration_s']:g} s measured after "
                  f"{p['warmup_s']:g} s warm-up. Send → agent receives the stored `msg`, ms. The floor relays "
                  f"the same frames inside one plain aiohttp process.", "",
                  "| path | messages | lost | dup | sent/s | delivered/s | p50 | p90 | p99 | max | sender lag p99 "
                  "| client CPU % |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ("kefu", "floor"):
            row = latency.get(name)
            if not row or "error" in row:
                continue
            ms, lag = row["latency_ms"] or {}, row["sender_lag_ms"] or {}
            lines.append(f"| {name} | {row['messages']} | {row['lost']} | {row['duplicates']} | "
                         f"{cell(row['achieved_rate'], '.0f')} | {cell(row.get('delivered_rate'), '.0f')} | "
                         f"{cell(ms.get('p50'))} | {cell(ms.get('p90'))} | "
                         f"{cell(ms.get('p99'))} | {cell(ms.get('max'))} | {cell(lag.get('p99'))} | "
                         f"{cell(row['client_cpu_percent'], '.0f')} |")
        failed = {name: row["error"] for name, row in latency.items() if "error" in row}
        kefu_row, floor_row = (None if n in failed else latency.get(n) for n in ("kefu", "floor"))
        if kefu_row and floor_row and kefu_row["latency_ms"] and floor_row["latency_ms"]:
            k_ms, f_ms = kefu_row["latency_ms"], floor_row["latency_ms"]
            lines.append(f"| kefu / floor | | | | | | {_ratio(k_ms['p50'], f_ms['p50'])} | | "
                         f"{_ratio(k_ms['p99'], f_ms['p99'])} | | | |")
        if kefu_row:
            for key, what in (("own_echo_ms", "the sender's own socket gets its stored `msg`"),
                              ("ack_ms", "the sender gets its `ack`")):
                if kefu_row.get(key):
                    lines += ["", f"Same run, send → {what}: p50 {kefu_row[key]['p50']:.1f} ms, "
                                  f"p99 {kefu_row[key]['p99']:.1f} ms."]
            if kefu_row.get("median_ms_by_second"):
                lines += ["", "Median latency per second of sending (warm-up first), ms: "
                              + ", ".join(f"{v:g}" for v in kefu_row["median_ms_by_second"]) + "."]
            if kefu_row.get("cpu_percent"):
                per_message = kefu_row["cpu_ms_per_message"]
                kefu_total = sum(v for n, v in per_message.items() if n != "client")
                lines += ["", "CPU from the first send to the last arrival, % of one core (`others`: the rest of "
                              f"the machine, of {machine['cpu_count'] * 100} %): "
                              + ", ".join(f"{n} {v}" for n, v in kefu_row["cpu_percent"].items()) + "; CPU ms per "
                              "delivered message: "
                              + ", ".join(f"{n} {v:g}" for n, v in per_message.items())
                              + f" (kefu total {kefu_total:.2f}). With nothing sent, the same set-up used: "
                              + ", ".join(f"{n} {v}" for n, v in kefu_row.get("idle_cpu_percent", {}).items())
                              + " (% of one core)."]
            for key in ("claims_refused", "problems"):
                if kefu_row[key]:
                    lines += ["", f"kefu {key.replace('_', ' ')}: {json.dumps(kefu_row[key], ensure_ascii=False)}"]
            if kefu_row["ai_frames_to_visitors"]:
                lines += ["", f"AI frames reached visitors during the run: {kefu_row['ai_frames_to_visitors']} "
                              "(the conversations were not all with an agent)."]
            p99 = (kefu_row["latency_ms"] or {}).get("p99")
            ok = p99 is not None and p99 <= 50 and p["rate"] >= 500 and not kefu_row["lost"]
            lines += ["", f"Target p99 ≤ 50 ms at 500 messages/s: **{'met' if ok else 'NOT met'}** "
                          f"(p99 {cell(p99)} ms at {p['rate']:g}/s, {kefu_row['lost']} lost)."]
            lines += shape_floor_lines(latency, kefu_row, machine["cpu_count"], p["rate"])
        lines += sweep_lines(latency)
        lines += [f"\nLatency ({name}) failed: {error}" for name, error in failed.items()]
        if "kefu" in failed:
            lines += ["", "Target p99 ≤ 50 ms at 500 messages/s: **not measured**."]
    problems = report.get("problems_in_logs")
    if problems:
        lines += ["", "Warnings and errors in the process logs:", ""]
        for name, entries in problems.items():
            lines += [f"- {name}:"] + [f"  - `{e}`" for e in entries]
    return "\n".join(lines) + "\n"


P99_LIMIT_MS = 50.0
"""A rate passes while visitor-to-agent p99 stays at most this, with nothing lost."""


def rate_rows(latency: dict[str, Any]) -> dict[float, dict[str, Any]]:
    """kefu's run at each swept rate and at the main rate, by offered rate."""
    rows = {float(r): row for r, row in (latency.get("sweep") or {}).items()}
    kefu_row = latency.get("kefu")
    if kefu_row and "error" not in kefu_row and kefu_row.get("offered_rate") is not None:
        rows[float(kefu_row["offered_rate"])] = kefu_row
    return dict(sorted(rows.items()))


def passes(row: dict[str, Any]) -> bool:
    p99 = (row.get("latency_ms") or {}).get("p99")
    return "error" not in row and p99 is not None and p99 <= P99_LIMIT_MS and not row["lost"]


def highest_rate_within(latency: dict[str, Any]) -> float | None:
    """The highest rate whose p99 stays within the limit with every lower measured rate within too."""
    return highest_within({rate: passes(row) for rate, row in rate_rows(latency).items()})


def sweep_lines(latency: dict[str, Any]) -> list[str]:
    """kefu at each swept rate (and the main one): CPU per live message per process, and how much it
    carries with p99 within 50 ms."""
    rows = rate_rows(latency)
    if len(rows) < 2:
        return []
    names = sorted({n for row in rows.values() if "error" not in row for n in row["cpu_ms_per_message"]},
                   key=lambda n: (n == "client", n))
    lines = ["", "kefu at each rate (same stack, fresh visitors and agents each time; `CPU %`: every kefu process "
                 "and nats-server, % of one core; then CPU ms per delivered message per process, `kefu` their sum "
                 "without the bench's client):", "",
             "| offered/s | delivered/s | lost | p50 ms | p99 ms | CPU % | " + " | ".join(names) + " | kefu |",
             "|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(names) + 1)]
    for offered, row in rows.items():
        if "error" in row:
            lines.append(f"| {offered:g} | failed: {row['error']} |" + " |" * (len(names) + 5))
            continue
        ms, per = row["latency_ms"] or {}, row["cpu_ms_per_message"]
        cpu = sum(v for n, v in row["cpu_percent"].items() if n not in ("client", "others"))
        kefu = sum(v for n, v in per.items() if n != "client")
        lines.append(f"| {offered:g} | {cell(row.get('delivered_rate'), '.0f')} | {row['lost']} | "
                     f"{cell(ms.get('p50'))} | {cell(ms.get('p99'))} | {cpu} | "
                     + " | ".join(cell(per.get(n), ".2f") for n in names) + f" | {kefu:.2f} |")
    best = highest_rate_within(latency)
    lines += ["", f"Highest rate with visitor → agent p99 ≤ {P99_LIMIT_MS:g} ms and nothing lost (every lower rate "
                  f"measured within too): **{f'{best:g} messages/s' if best is not None else 'none'}**."]
    return lines


def shape_floor_lines(latency: dict[str, Any], kefu_row: dict[str, Any], cpu_count: int,
                      rate: float) -> list[str]:
    """What the fixed shape costs per message before any of kefu's own work, from parts measured in this run."""
    grpc_row, floor_row = latency.get("grpc_floor"), latency.get("floor")
    if not grpc_row or "error" in grpc_row:
        return []
    grpc_ms = sum(grpc_row["cpu_ms_per_message"].values())
    parts = {"two empty unary gRPC calls (client and both servers)": grpc_ms,
             "nats-server (in the kefu run)": kefu_row["cpu_ms_per_message"].get("nats", 0.0),
             "the bench's client (in the kefu run)": kefu_row["cpu_ms_per_message"].get("client", 0.0)}
    if floor_row and "error" not in floor_row:
        parts["relaying the frames (the plain aiohttp floor)"] = floor_row["cpu_ms_per_message"].get("floor", 0.0)
    total = sum(parts.values())
    return ["", f"The shape's own share, same run (bench/grpc_floor.py: two calls of an empty method with kefu's "
                f"server and channel options, one after the other, {rate:g} messages/s; p99 "
                f"{grpc_row['latency_ms']['p99']:.1f} ms): CPU ms per message: "
                + ", ".join(f"{name} {value:.2f}" for name, value in parts.items())
                + f"; {total:.2f} ms in all, which at 500 messages/s is {total * 500 / 1000:.2f} of this machine's "
                  f"{cpu_count} cores before any of kefu's own work."]
