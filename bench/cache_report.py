"""The cache bench's figures: one turn as the client saw it, the cache's counters, medians over rounds, markdown."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench import results_io
from bench.cache_workload import P95_GOAL_MS
from bench.loadgen import percentiles


@dataclass(frozen=True, slots=True)
class Turn:
    """One question as the client saw it; times in seconds from just before its POST."""

    visitor: int
    tenant: str
    index: int
    started_s: float
    """When its POST left, seconds from the start of the stream."""
    kind: str
    entry: str
    variant: str
    text: str
    ok: bool
    ttft_s: float | None
    total_s: float
    cached: bool
    error: str | None = None
    predicted_cacheable: bool = False


# ---------------------------------------------------------------- figures


def ms_stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = percentiles([v * 1000 for v in values], (50, 95, 99))
    return {"p50": p50, "p95": p95, "p99": p99}


def turn_figures(turns: Sequence[Turn], duration_s: float) -> dict[str, Any]:
    good = [t for t in turns if t.ok and t.ttft_s is not None]
    half = (max((t.visitor for t in turns), default=0) + 1) // 2
    faq = [t for t in good if t.kind == "faq"]
    return {
        "turns": len(turns),
        "failed": sum(1 for t in turns if not t.ok),
        "errors": dict(Counter(t.error or "unknown" for t in turns if not t.ok)),
        "cached": sum(t.cached for t in good),
        "hit_ratio": sum(t.cached for t in good) / len(good) if good else None,
        "hit_ratio_faq": sum(t.cached for t in faq) / len(faq) if faq else None,
        "personal_cached": sum(1 for t in good if t.kind == "personal" and t.cached),
        "predicted_cacheable": sum(t.predicted_cacheable for t in turns),
        "cached_but_not_predicted": sum(1 for t in good if t.cached and not t.predicted_cacheable),
        "duration_s": duration_s,
        "ttft_ms": ms_stats([t.ttft_s for t in good if t.ttft_s is not None]),
        "ttft_mean_ms": (sum(t.ttft_s for t in good if t.ttft_s is not None) * 1000 / len(good)) if good else None,
        "under_goal": (sum(1 for t in good if t.ttft_s is not None and t.ttft_s * 1000 < P95_GOAL_MS) / len(good)
                       if good else None),
        "ttft_ms_later_half": ms_stats([t.ttft_s for t in good if t.ttft_s is not None and t.visitor >= half]),
        "ttft_ms_hits": ms_stats([t.ttft_s for t in good if t.cached and t.ttft_s is not None]),
        "ttft_ms_misses": ms_stats([t.ttft_s for t in good if not t.cached and t.ttft_s is not None]),
        "ttft_ms_personal": ms_stats([t.ttft_s for t in good if t.kind == "personal" and t.ttft_s is not None]),
        "ttft_ms_novel": ms_stats([t.ttft_s for t in good if t.kind == "novel" and t.ttft_s is not None]),
        # The turns the cache rule lets the cache serve at all (predicted with the worker's own rule).
        "ttft_ms_cacheable": ms_stats([t.ttft_s for t in good if t.predicted_cacheable and t.ttft_s is not None]),
        "hit_ratio_cacheable": (sum(t.cached for t in good if t.predicted_cacheable)
                                / max(1, sum(1 for t in good if t.predicted_cacheable))),
        "ttft_ms_later_turns": ms_stats([t.ttft_s for t in good if t.index > 0 and t.ttft_s is not None]),
        "hit_ratio_later_turns": (sum(t.cached for t in good if t.index > 0)
                                  / max(1, sum(1 for t in good if t.index > 0))),
        "total_ms": ms_stats([t.total_s for t in good]),
    }


MEDIAN_FIGURES = ("hit_ratio", "under_goal", "ttft_mean_ms", "hit_ratio_later_turns", "hit_ratio_cacheable")
MEDIAN_MS = ("ttft_ms", "ttft_ms_later_half", "ttft_ms_hits", "ttft_ms_misses", "ttft_ms_personal", "ttft_ms_novel",
             "ttft_ms_cacheable", "ttft_ms_later_turns", "total_ms")


def _median(values: Sequence[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    middle = len(known) // 2
    return known[middle] if len(known) % 2 else (known[middle - 1] + known[middle]) / 2


def median_rounds(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per mode, in the order first run: every figure the tables show as the median over its rounds
    (each figure on its own, so a row may mix rounds); `rounds_p95` lists each round's p95."""
    by_mode: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        by_mode.setdefault(run["mode"]["name"], []).append(run)
    out = []
    for group in by_mode.values():
        if len(group) == 1:
            out.append({**group[0], "rounds_p95": [group[0]["figures"]["ttft_ms"]["p95"]]})
            continue
        figures = dict(group[0]["figures"])
        for name in MEDIAN_FIGURES:
            figures[name] = _median([g["figures"][name] for g in group])
        for name in MEDIAN_MS:
            figures[name] = {q: _median([g["figures"][name][q] for g in group]) for q in ("p50", "p95", "p99")}
        figures["failed"] = sum(g["figures"]["failed"] for g in group)
        figures["errors"] = dict(sum((Counter(g["figures"]["errors"]) for g in group), Counter()))
        metrics = dict(group[0]["metrics"])
        for name in ("lookups", "hits_local", "hits_shared", "hit_ratio"):
            metrics[name] = _median([g["metrics"][name] for g in group])
        metrics["pregenerations"] = {k: _median([g["metrics"]["pregenerations"][k] for g in group])
                                     for k in group[0]["metrics"]["pregenerations"]}
        live = {k: _median([g["live_streams"][k] for g in group]) for k in ("mean", "max", "share_at_or_over_8")}
        out.append({"mode": group[0]["mode"], "figures": figures, "metrics": metrics, "live_streams": live,
                    "upstream_calls": _median([g["upstream_calls"] for g in group]),
                    "cpu_s": {"llm_worker": _median([g["cpu_s"].get("llm_worker") for g in group])},
                    "rounds_p95": [g["figures"]["ttft_ms"]["p95"] for g in group]})
    return out


def cell(value: float | None, fmt: str = ".0f") -> str:
    """This report's cells: whole milliseconds unless told."""
    return results_io.cell(value, fmt)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def render_markdown(report: Mapping[str, Any]) -> str:
    p, w, machine = report["parameters"], report["workload"], report["machine"]
    direct = report["direct"]
    lines = [
        f"# kefu cache bench, {report['timestamp']}",
        "",
        f"{machine['cpu_count']} CPUs, load average {machine['loadavg_start'][0]:.2f} at start, "
        f"{machine['loadavg_end'][0]:.2f} at end. Upstream TTFT {p['ttft_ms']:g} ms, {p['chunks']} chunks "
        f"{p['interval_ms']:g} ms apart. {w['visitors']} visitors ({p['concurrency']} at a time), {w['turns']} "
        f"turns ({w['personal_turns']} personal), seed {p['workload']['seed']}, Zipf s={p['workload']['zipf_s']}, "
        f"reading time {p['workload']['think_s'][0]:g}-{p['workload']['think_s'][1]:g} s; "
        f"free wordings {p['workload']['free_share']:g}, novel {p['workload']['novel_share']:g}, personal "
        f"{p['workload']['personal_share']:g}; "
        + (f"measured after {p['prior_visitors']} unmeasured earlier visitors (seed+1) in the same tenants "
           f"(steady state); " if p['prior_visitors'] else "measured from a cold start; ")
        + (f"medians of {p['rounds']} rounds per mode (modes alternating); " if p['rounds'] > 1 else "")
        + "times in ms.",
        "",
        "| mode | turns | errors | from cache, all turns | hits / lookups (metrics) | TTFT p50 | TTFT p95 "
        "| TTFT p99 | TTFT mean | under 380 ms | p95, later half | cache hits p50 / p95 | upstream calls "
        "| worker CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| direct (no kefu) | {direct['requests']} | {direct['failed']} | – | – | "
        f"{cell(direct['ttft_ms']['p50'])} | {cell(direct['ttft_ms']['p95'])} | {cell(direct['ttft_ms']['p99'])} "
        f"| – | – | – | – | {direct['requests']} | – |",
    ]
    for run in report["modes"]:
        f, m = run["figures"], run["metrics"]
        lines.append(
            f"| {run['mode']['name']} | {f['turns']} | {f['failed']} | {pct(f['hit_ratio'])} | "
            f"{pct(m['hit_ratio']) if run['mode']['cache'] else '–'} | "
            f"{cell(f['ttft_ms']['p50'])} | **{cell(f['ttft_ms']['p95'])}** | {cell(f['ttft_ms']['p99'])} | "
            f"{cell(f['ttft_mean_ms'])} | {pct(f['under_goal'])} | {cell(f['ttft_ms_later_half']['p95'])} | "
            f"{cell(f['ttft_ms_hits']['p50'])} / {cell(f['ttft_ms_hits']['p95'])} | "
            f"{cell(run['upstream_calls'])} | {cell(run['cpu_s'].get('llm_worker'), '.1f')} |")
    lines += [
        "",
        f"Workload: {w['faq_turns']} FAQ turns ({w['free_wording_turns']} worded as the FAQ does not), "
        f"{w['novel_turns']} the FAQ does not cover and {w['personal_turns']} personal ones; {w['distinct_texts']} "
        f"distinct texts, {w['distinct_keys']} distinct normalised questions. The worker's rule lets "
        f"{w['cacheable_turns']} turns ({pct(w['cacheable_share'])}) use the cache (predicted with the "
        f"knowledge-base plugin); with {w['distinct_cacheable_keys']} distinct keys among them, a cache alone "
        f"(unbounded, cold start, no pre-generation) can answer at most {pct(w['cache_only_ceiling'])} of the "
        f"turns; {w['canonical_turns']} cacheable turns map to an FAQ entry's canonical question, leaving "
        f"{w['distinct_answer_slots']} distinct answers, so with canonical keys a cache alone can answer at most "
        f"{pct(w['canonical_cache_only_ceiling'])}. Pre-generation can be asked for "
        f"{w['pregen_candidates']} distinct questions, of which "
        f"{w['pregen_candidates_asked']} are ever asked by a cacheable turn ({w['cacheable_pregen_shaped_turns']} "
        f"cacheable turns are worded, after normalisation, as pre-generation words their entry). "
        f"p95 under {P95_GOAL_MS:g} ms needs at least 95 % of all turns answered from the cache: every other "
        f"turn waits for the upstream's first token ({p['ttft_ms']:g} ms).",
        "",
        "| mode | cacheable: lookups / predicted | from cache, 2nd+ turns | TTFT p50 / p95, 2nd+ turns "
        "| from cache / TTFT p50 / p95, cacheable turns | TTFT p95, personal / novel "
        "| pregen started / served / skipped / wasted | live streams mean / max / ≥ 8 | local / shared hits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["modes"]:
        f, m, live = run["figures"], run["metrics"], run["live_streams"]
        pregen = m["pregenerations"]
        pregen_cell = (" / ".join(f"{pregen[k]:.0f}" for k in ("started", "served", "skipped", "wasted"))
                       if run["mode"]["pregen"] else "–")
        if run["mode"]["cache"]:
            lookups, tiers = f"{m['lookups']:.0f} / {f['predicted_cacheable']}", \
                f"{m['hits_local']:.0f} / {m['hits_shared']:.0f}"
        else:
            lookups, tiers = f"– / {f['predicted_cacheable']}", "–"
        lines.append(
            f"| {run['mode']['name']} | {lookups} | {pct(f['hit_ratio_later_turns'])} | "
            f"{cell(f['ttft_ms_later_turns']['p50'])} / {cell(f['ttft_ms_later_turns']['p95'])} | "
            f"{pct(f['hit_ratio_cacheable'])} / {cell(f['ttft_ms_cacheable']['p50'])} / "
            f"{cell(f['ttft_ms_cacheable']['p95'])} | "
            f"{cell(f['ttft_ms_personal']['p95'])} / {cell(f['ttft_ms_novel']['p95'])} | {pregen_cell} | "
            f"{live['mean']:.1f} / {live['max']:.0f} / {pct(live['share_at_or_over_8'])} | {tiers} |")
    verdicts = []
    for run in report["modes"]:
        if run["mode"]["cache"] and run["mode"]["pregen"]:
            p95 = run["figures"]["ttft_ms"]["p95"]
            met = p95 is not None and p95 < P95_GOAL_MS
            verdicts.append(f"- {run['mode']['name']}: p95 {cell(p95)} ms, goal {P95_GOAL_MS:g} ms "
                            f"{'met' if met else 'NOT met'}; {pct(run['figures']['under_goal'])} of the turns "
                            f"had their first token within {P95_GOAL_MS:g} ms (95 % needed); over the turns the "
                            f"cache may serve at all, p95 {cell(run['figures']['ttft_ms_cacheable']['p95'])} ms; "
                            f"p95 of each round: {', '.join(cell(v) for v in run['rounds_p95'])} ms.")
    problems = [f"- {mode}/{proc}: {line}" for mode, by_proc in report["log_problems"].items()
                for proc, found in by_proc.items() for line in found]
    errors = [f"- {run['mode']['name']}: {json.dumps(run['figures']['errors'])}"
              for run in report["modes"] if run["figures"]["errors"]]
    lines += ["", *verdicts]
    if errors:
        lines += ["", "Errors:", *errors]
    if problems:
        lines += ["", "Warnings and errors in the process logs:", *problems]
    return "\n".join(lines) + "\n"


def cache_figures(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """Deltas of the worker's cache and pre-generation counters over the measured stream."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    local_hit = delta("kefu_cache_requests_total{result=hit,tier=local}")
    local_miss = delta("kefu_cache_requests_total{result=miss,tier=local}")
    shared_hit = delta("kefu_cache_requests_total{result=hit,tier=shared}")
    shared_miss = delta("kefu_cache_requests_total{result=miss,tier=shared}")
    lookups = local_hit + local_miss  # every lookup counts once at the local tier
    return {
        "lookups": lookups,
        "hits_local": local_hit,
        "hits_shared": shared_hit,
        "misses_shared": shared_miss,
        "hit_ratio": (local_hit + shared_hit) / lookups if lookups else None,
        "hit_ratio_gauge": after.get("kefu_cache_hit_ratio{}"),
        "local_bytes": after.get("kefu_cache_local_bytes{}"),
        "pregenerations": {result: delta(f"kefu_pregenerations_total{{result={result}}}")
                           for result in ("started", "served", "wasted", "skipped")},
        "upstream_generations": sum(
            delta(name) for name in after if name.startswith("kefu_llm_requests_total{")
            and "provider=openai_compatible" in name),
    }
