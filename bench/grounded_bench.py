"""`python -m bench.grounded_bench`: what grounding adds to one chat turn in the worker, in process.

A turn of a tenant with documents runs `grounded.plan_turn` (its knowledge snapshot, the small-talk check,
retrieval of the top passages with the follow-up rule) before any provider is asked, and offline the
extractive answer (`extract_answer`). Both run on the worker's event loop with the tenant's index in
memory: no network hop. This measures them per turn, wall and CPU, for every CMRC 2018 trial question
(asked alone, and as a follow-up after another question of its article) against

- the trial set as one tenant (256 articles as documents), and
- one tenant of 100,000 synthetic chunks (runs of CMRC sentences, as `make bench-kb` builds them).

On a shared machine wall-time tails follow the neighbours' load; the CPU columns are the turn's own cost.
Results: a table on stdout and bench/results/grounded-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.kb_bench import RESULTS_DIR, Article, load_articles, percentile, synthetic_chunks
from services.llm_worker.grounded import Grounding, TenantSnapshot, plan_turn
from services.llm_worker.kb.library import TenantKnowledge
from services.llm_worker.knowledge.chunking import chunk_document
from services.llm_worker.knowledge.extractive import extract_answer
from services.llm_worker.knowledge.index import KnowledgeIndex
from services.llm_worker.knowledge.parsing import parse_document
from services.llm_worker.plugin_api import ChatMessage

SYSTEM = ChatMessage("system", "你是一个知识库问答助手。")


class OneTenant:
    """The KnowledgeSource a worker has once the tenant's index is loaded: a lookup, then the snapshot."""

    def __init__(self, snapshot: TenantSnapshot) -> None:
        self._snapshot = snapshot

    async def snapshot(self, tenant: str) -> TenantSnapshot:
        return self._snapshot


def trial_index(articles: Sequence[Article]) -> KnowledgeIndex:
    chunks = []
    for article in articles:
        parsed = parse_document(article.context.encode(), f"{article.id}.txt")
        chunks += chunk_document(parsed, document_id=article.id, version=1, title=article.title, url="")
    return KnowledgeIndex.build(chunks)


def turns(articles: Sequence[Article]) -> list[list[ChatMessage]]:
    """Every question alone, and every question after the previous one of its article (a follow-up turn)."""
    found = []
    for article in articles:
        previous = ""
        for question in article.questions:
            found.append([SYSTEM, ChatMessage("user", question.text)])
            if previous:
                found.append([SYSTEM, ChatMessage("user", previous), ChatMessage("assistant", "……"),
                              ChatMessage("user", question.text)])
            previous = question.text
    return found


async def measure(index: KnowledgeIndex, conversations: Sequence[list[ChatMessage]], rounds: int,
                  ) -> dict[str, Any]:
    source = OneTenant(TenantKnowledge("bench", 1, index))
    grounding = Grounding()
    for messages in conversations[:50]:  # warm the analyzer's caches
        await plan_turn(source, "bench", messages, grounding, offline=True)
    plan_walls, plan_cpus, extract_walls, extract_cpus = [], [], [], []
    grounded = 0
    for _ in range(rounds):
        for messages in conversations:
            wall, cpu = time.perf_counter(), time.process_time()
            plan = await plan_turn(source, "bench", messages, grounding, offline=True)
            plan_cpus.append(time.process_time() - cpu)
            plan_walls.append(time.perf_counter() - wall)
            if plan.kind != "grounded":
                continue
            grounded += 1
            wall, cpu = time.perf_counter(), time.process_time()
            extract_answer(messages[-1].content, plan.hits)
            extract_cpus.append(time.process_time() - cpu)
            extract_walls.append(time.perf_counter() - wall)
    return {"chunks": len(index), "turns": len(plan_walls), "grounded_share": round(grounded / len(plan_walls), 3),
            "plan": figures(plan_walls, plan_cpus), "extract": figures(extract_walls, extract_cpus)}


def figures(walls: Sequence[float], cpus: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(walls, 0.5) * 1000, 3), "p99_ms": round(percentile(walls, 0.99) * 1000, 3),
            "max_ms": round(max(walls) * 1000, 3), "cpu_mean_ms": round(statistics.mean(cpus) * 1000, 3),
            "cpu_p99_ms": round(percentile(cpus, 0.99) * 1000, 3)}


def table(report: dict[str, Any]) -> str:
    lines = ["| tenant | chunks | turns | step | p50 ms | p99 ms | max ms | CPU mean ms | CPU p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, run in report["runs"].items():
        for step in ("plan", "extract"):
            f = run[step]
            lines.append(f"| {name} | {run['chunks']} | {run['turns']} | {step} | {f['p50_ms']} | {f['p99_ms']} | "
                         f"{f['max_ms']} | {f['cpu_mean_ms']} | {f['cpu_p99_ms']} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    articles = load_articles()
    conversations = turns(articles)
    runs = {"cmrc-trial": await measure(trial_index(articles), conversations, args.rounds)}
    if args.chunks:
        big = KnowledgeIndex.build(synthetic_chunks(articles, args.chunks, seed=7))
        runs[f"synthetic-{args.chunks}"] = await measure(big, conversations, 1)
    return {"when": datetime.now(UTC).isoformat(timespec="seconds"), "python": platform.python_version(),
            "machine": platform.machine(), "runs": runs}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grounded_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the questions on the trial tenant")
    parser.add_argument("--chunks", type=int, default=100_000, help="synthetic tenant size (0 skips it)")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(table(report))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(RESULTS_DIR) / f"grounded-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written {path}")


if __name__ == "__main__":
    main()
