"""`python -m bench.grounded_bench`: what grounding adds to one chat turn in the worker, in process.

A turn of a tenant with documents runs `grounded.plan_turn` (its knowledge snapshot, the small-talk check,
retrieval of the top passages with the follow-up rule) before any provider is asked, and offline the
extractive answer (`extract_answer`). Both run on the worker's event loop with the tenant's index in
memory: no network hop. This measures them per turn, wall and CPU, for every CMRC 2018 trial question
(asked alone, and as a follow-up after another question of its article) against

- the trial set as one tenant (256 articles as documents), and
- one tenant of 100,000 synthetic chunks (runs of CMRC sentences, as `make bench-kb` builds them);
- with `--stack-turns N`: the real processes (`make run`'s demo tenant, seeded from its folder) answering N
  turns of its FAQ questions over /v1/chat, read from the worker's `kefu_kb_retrieval_duration_seconds`.

On a shared machine wall-time tails follow the neighbours' load; the CPU columns are the turn's own cost.
Results: a table on stdout and bench/results/grounded-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.cmrc import Article, load_articles
from bench.kb_scale import synthetic_chunks
from bench.loadgen import rank_percentile
from bench.results_io import RESULTS_DIR
from devtools.devstack.stack import REPO_ROOT, Stack, StackConfig, StackPorts
from devtools.mint_token import mint
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
    return {"p50_ms": round(rank_percentile(walls, 0.5) * 1000, 3),
            "p99_ms": round(rank_percentile(walls, 0.99) * 1000, 3), "max_ms": round(max(walls) * 1000, 3),
            "cpu_mean_ms": round(statistics.mean(cpus) * 1000, 3),
            "cpu_p99_ms": round(rank_percentile(cpus, 0.99) * 1000, 3)}


DEMO_KNOWLEDGE = REPO_ROOT / "services" / "llm_worker" / "demo_knowledge"


def demo_questions() -> list[str]:
    faq = json.loads((DEMO_KNOWLEDGE / "demo" / "shop-faq.json").read_text(encoding="utf-8"))
    return [q for entry in faq["entries"] for q in entry["questions"]["zh"]]


def bucket_quantile(buckets: Sequence[tuple[float, float]], share: float) -> float:
    """The upper bound of the histogram bucket holding the `share` quantile (cumulative counts)."""
    total = buckets[-1][1]
    return next(bound for bound, count in buckets if count >= share * total)


def retrieval_histogram(metrics_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "kefu_kb_retrieval_duration_seconds")
    samples = {(s.name, s.labels.get("le", "")): s.value for s in family.samples}
    buckets = sorted((float(le), count) for (name, le), count in samples.items() if name.endswith("_bucket"))
    count, total = samples[(family.name + "_count", "")], samples[(family.name + "_sum", "")]
    return {"turns": int(count), "mean_ms": round(total / count * 1000, 3),
            "p50_le_ms": bucket_quantile(buckets, 0.5) * 1000, "p99_le_ms": bucket_quantile(buckets, 0.99) * 1000}


async def ask_demo(base_url: str, secret: str, turns: int) -> list[float]:
    """Wait for the demo's documents, then `turns` questions, one at a time; each turn's time at the client."""
    admin = {"Authorization": f"Bearer {mint(secret, tenant='demo', subject='bench-admin', role='admin')}"}
    questions = demo_questions()
    walls = []
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            async with http.post(f"{base_url}/v1/knowledge/search", json={"query": "满多少包邮"},
                                 headers=admin) as reply:
                found = (await reply.json()).get("results", []) if reply.status == 200 else []
            if any(r["document_id"] == "shop-faq" for r in found):
                break
            await asyncio.sleep(0.2)
        for number in range(turns):
            visitor = mint(secret, tenant="demo", subject=f"bench-{number}", role="visitor")
            start = time.perf_counter()
            async with http.post(f"{base_url}/v1/chat", json={"message": questions[number % len(questions)],
                                                              "stream": False},
                                 headers={"Authorization": f"Bearer {visitor}"}) as reply:
                assert reply.status == 200, await reply.text()
                await reply.read()
            walls.append(time.perf_counter() - start)
    return walls


def stack_run(turns: int) -> dict[str, Any]:
    secret = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="grounded-bench-") as work:
        stack = Stack(StackConfig(data_dir=Path(work), jwt_secret=secret, ports=StackPorts.free(), log_dir=Path(work),
                                  env={"KEFU_KB_SEED_DIR": str(DEMO_KNOWLEDGE), "KEFU_CACHE_ENABLED": "false",
                                       "KEFU_RATE_LIMIT_RPS": "100000", "KEFU_RATE_LIMIT_BURST": "100000",
                                       "KEFU_TENANT_RATE_LIMIT_RPS": "100000", "KEFU_SHUTDOWN_GRACE_S": "2"}))
        stack.start()
        try:
            walls = asyncio.run(ask_demo(stack.base_url, secret, turns))
            retrieval = retrieval_histogram(f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics")
        finally:
            stack.stop()
    return {"retrieval_in_worker": retrieval,
            "turn_at_client": {"p50_ms": round(rank_percentile(walls, 0.5) * 1000, 2),
                               "p99_ms": round(rank_percentile(walls, 0.99) * 1000, 2)}}


def table(report: dict[str, Any]) -> str:
    lines = ["| tenant | chunks | turns | step | p50 ms | p99 ms | max ms | CPU mean ms | CPU p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, run in report["runs"].items():
        for step in ("plan", "extract"):
            f = run[step]
            lines.append(f"| {name} | {run['chunks']} | {run['turns']} | {step} | {f['p50_ms']} | {f['p99_ms']} | "
                         f"{f['max_ms']} | {f['cpu_mean_ms']} | {f['cpu_p99_ms']} |")
    if "stack" in report:
        stack = report["stack"]
        retrieval, client = stack["retrieval_in_worker"], stack["turn_at_client"]
        lines.append(f"\nreal stack, demo tenant: {retrieval['turns']} turns; retrieval in the worker mean "
                     f"{retrieval['mean_ms']} ms, p50 <= {retrieval['p50_le_ms']:g} ms, p99 <= "
                     f"{retrieval['p99_le_ms']:g} ms (histogram buckets); whole offline turn at the client p50 "
                     f"{client['p50_ms']} ms, p99 {client['p99_ms']} ms")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    articles = load_articles()
    conversations = turns(articles)
    runs = {"cmrc-trial": await measure(trial_index(articles), conversations, args.rounds)}
    if args.chunks:
        big = KnowledgeIndex.build(synthetic_chunks(articles, args.chunks, seed=7))
        runs[f"synthetic-{args.chunks}"] = await measure(big, conversations, 1)
    report: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                              "python": platform.python_version(), "machine": platform.machine(), "runs": runs}
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grounded_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the questions on the trial tenant")
    parser.add_argument("--chunks", type=int, default=100_000, help="synthetic tenant size (0 skips it)")
    parser.add_argument("--stack-turns", type=int, default=0, help="also ask the real stack this many turns")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    if args.stack_turns:
        report["stack"] = stack_run(args.stack_turns)
    print(table(report))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(RESULTS_DIR) / f"grounded-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written {path}")


if __name__ == "__main__":
    main()
