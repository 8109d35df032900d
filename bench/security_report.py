"""The security bench's figures per phase (p99 against idle, refusals, CPU share, RSS) and its markdown."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import percentile
from bench.results_io import cell
from bench.security_params import AGENT, K8S_EDGE_MEMORY_LIMIT_MIB, OTHER_AGENT


@dataclass
class Phase:
    name: str
    latencies_s: list[float] = field(default_factory=list)
    visitor_errors: Counter[str] = field(default_factory=Counter)
    attack: Counter[str] = field(default_factory=Counter)
    readyz: Counter[int] = field(default_factory=Counter)
    rss_mib: list[float] = field(default_factory=list)
    round_p99_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds each kefu process spent during this phase's rounds."""
    load_average: list[float] = field(default_factory=list)
    """The machine's 1-minute load average at the end of each round (2 cores here: above 2 is contention)."""
    edge_counters: dict[str, float] = field(default_factory=dict)
    """What the edge's own counters (connection guard, 429s) rose by during this phase's rounds."""

    def summary(self, idle: Phase) -> dict[str, Any]:
        p50 = percentile(self.latencies_s, 50) if self.latencies_s else None
        p99 = percentile(self.latencies_s, 99) if self.latencies_s else None
        idle_p99 = percentile(idle.latencies_s, 99) if idle.latencies_s else None
        ratios = [mine / theirs for mine, theirs in zip(self.round_p99_s, idle.round_p99_s, strict=False) if theirs]
        attempts = sum(self.attack.values())
        refused_429 = sum(n for kind, n in self.attack.items() if " 429" in kind or kind.endswith("nack"))
        return {"phase": self.name, "turns": len(self.latencies_s), "visitor_errors": dict(self.visitor_errors),
                "p50_ms": p50 and p50 * 1e3, "p99_ms": p99 and p99 * 1e3,
                "p99_vs_idle": p99 / idle_p99 if p99 and idle_p99 else None,
                "round_p99_ms": [round(v * 1e3, 1) for v in self.round_p99_s],
                "round_p99_vs_idle_median": statistics.median(ratios) if ratios else None,
                "load_average": self.load_average,
                "cpu_share": {name: round(seconds / self.seconds, 2) for name, seconds in self.cpu_s.items()}
                if self.seconds else {},
                "attack": dict(sorted(self.attack.items())),
                "attacker_attempts_per_s": round(attempts / self.seconds, 1) if self.seconds else None,
                "refused_at_accept": {reason: int(self.edge_counters.get(f"cut {reason}", 0))
                                      for reason in ("rate", "penalty")},
                "penalty_windows": int(self.edge_counters.get("penalties", 0)),
                "refused_429": refused_429, "edge_counters": dict(sorted(self.edge_counters.items())),
                "readyz": {str(k): v for k, v in self.readyz.items()},
                "rss_mib_max": max(self.rss_mib, default=None), "rss_mib_min": min(self.rss_mib, default=None)}


def render(report: dict[str, Any]) -> str:
    params = report["params"]
    lines = [f"# Security bench {report['started']}", "",
             f"{params['visitors']} visitors, one /v1/chat turn each every {params['interval_s']} s; "
             f"{params['duration_s']:g} s per phase, {params['rounds']} rounds; "
             f"edge RSS before {report['edge_rss_mib_before']:.0f} MiB "
             f"(k8s limit {K8S_EDGE_MEMORY_LIMIT_MIB} MiB). Real console logins afterwards, from a fresh "
             f"address: another agent HTTP {report['real_login_after'][OTHER_AGENT]}, the agent the flood "
             f"guessed at HTTP {report['real_login_after'][AGENT]} (429 until its failure bucket has a token "
             f"again, one a minute by default). Attacker at nice {report['attacker_nice']}. Load average "
             f"{report.get('load_average_start', '–')} at the start.", "",
             "| phase | turns | visitor errors | p50 ms | p99 ms | p99 / idle | rounds' p99 ms | median of the "
             "rounds' p99 / idle | load average | CPU (cores) of edge, session, moderation, worker "
             "| edge RSS max MiB | readyz | attack answers/s | cut at accept (rate, penalty) | 429 or nack "
             "| attack answers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    processes = ("gateway", "session", "moderation", "llm_worker")
    for p in report["phases"]:
        lines.append(f"| {p['phase']} | {p['turns']} | {json.dumps(p['visitor_errors']) if p['visitor_errors'] else 0} "
                     f"| {cell(p['p50_ms'], '.0f')} | {cell(p['p99_ms'], '.0f')} | {cell(p['p99_vs_idle'], '.2f')} "
                     f"| {', '.join(f'{v:.0f}' for v in p['round_p99_ms'])} "
                     f"| {cell(p['round_p99_vs_idle_median'], '.2f')} | {', '.join(map(str, p['load_average']))} "
                     f"| {', '.join(str(p['cpu_share'].get(name, '–')) for name in processes)} "
                     f"| {cell(p['rss_mib_max'], '.0f')} | {json.dumps(p['readyz'])} "
                     f"| {cell(p['attacker_attempts_per_s'], '.0f')} "
                     f"| {p['refused_at_accept']['rate']}, {p['refused_at_accept']['penalty']} "
                     f"({p['penalty_windows']} windows) | {p['refused_429']} | {json.dumps(p['attack'])} |")
    return "\n".join(lines) + "\n"
