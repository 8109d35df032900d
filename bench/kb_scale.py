"""The knowledge bench's scale runs: indexes built in one process, loaded and queried in a fresh one each."""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.cmrc import PROMPT_PASSAGES, Article, load_articles
from bench.loadgen import rank_percentile
from bench.proc_stats import memory_kib
from services.llm_worker.knowledge.analysis import Analyzer, split_sentences
from services.llm_worker.knowledge.index import KnowledgeIndex
from services.llm_worker.knowledge.models import Chunk
from services.llm_worker.knowledge.retrieval import retrieve


def rss_bytes() -> int:
    """This process's VmRSS in bytes."""
    return memory_kib(os.getpid()).get("VmRSS", 0) * 1024


def synthetic_chunks(articles: Sequence[Article], count: int, seed: int, prefix: str = "syn") -> list[Chunk]:
    """`count` chunks of 3-8 consecutive sentences of random CMRC articles (about 150-400 tokens each)."""
    rng = random.Random(seed)
    sentences = [(a.title, split_sentences(a.context)) for a in articles]
    chunks = []
    for number in range(count):
        title, pool = rng.choice(sentences)
        size = rng.randint(3, 8)
        start = rng.randrange(max(1, len(pool) - size))
        document = f"{prefix}{number // 4}"
        chunks.append(Chunk(chunk_id=f"{document}-1-{number % 4}", document_id=document, version=1, title=title,
                            url="", heading="", text="".join(pool[start:start + size])))
    return chunks


def time_queries(pick: Callable[[int], KnowledgeIndex], questions: Sequence[str], rounds: int) -> dict[str, float]:
    """Wall and CPU time of `retrieve` (k = PROMPT_PASSAGES) per query, in ms."""
    for question in questions[:50]:  # warm caches
        retrieve(pick(0), question, k=PROMPT_PASSAGES)
    walls, cpus = [], []
    number = 0
    for _ in range(rounds):
        for question in questions:
            index = pick(number)
            number += 1
            wall, cpu = time.perf_counter(), time.process_time()
            retrieve(index, question, k=PROMPT_PASSAGES)
            cpus.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - wall)
    return {"queries": len(walls), "p50_ms": round(rank_percentile(walls, 0.5) * 1000, 3),
            "p99_ms": round(rank_percentile(walls, 0.99) * 1000, 3), "max_ms": round(max(walls) * 1000, 3),
            "cpu_mean_ms": round(statistics.mean(cpus) * 1000, 3),
            "cpu_p99_ms": round(rank_percentile(cpus, 0.99) * 1000, 3)}


def _warm_process(articles: Sequence[Article]) -> int:
    """Load the segmenter's dictionary, OpenCC and numpy before measuring; the RSS baseline after that."""
    KnowledgeIndex.build(synthetic_chunks(articles, 20, seed=0)).search("测试", 5)
    gc.collect()
    return rss_bytes()


class _MemoAnalyzer(Analyzer):
    """Analyzes each distinct text once: the scale runs index the same synthetic chunks several ways."""

    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[str, list[str]] = {}

    def terms(self, text: str) -> list[str]:
        found = self._memo.get(text)
        if found is None:
            found = self._memo[text] = super().terms(text)
        return found


def build_scales(directory: str, runs: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Build and store every run's indexes (as ingestion does, in a process of its own) from one pool of
    synthetic chunks: tenant t of a run gets chunks [t * n, (t + 1) * n). The largest run is built first,
    so its build time is a real one (the others reuse its chunks' analysis)."""
    articles = load_articles()
    pool = synthetic_chunks(articles, max(tenants * chunks for tenants, chunks in runs), seed=1)
    analyzer = _MemoAnalyzer()
    build_s: dict[str, float] = {}
    for tenants, chunks in sorted(runs, key=lambda run: -run[0] * run[1]):
        started = time.perf_counter()
        for tenant in range(tenants):
            index = KnowledgeIndex.build(pool[tenant * chunks:(tenant + 1) * chunks], analyzer)
            Path(directory, f"{tenants}x{chunks}-{tenant}.kb").write_bytes(index.to_bytes())
        build_s[f"{tenants}x{chunks}"] = round(time.perf_counter() - started, 1)
    return build_s


def serve_tenants(directory: str, tenants: int, chunks: int, rounds: int) -> dict[str, Any]:
    """Load every tenant's index from its bytes (as a worker does), then ask the CMRC questions of random
    tenants: RSS and latency."""
    articles = load_articles()
    baseline = _warm_process(articles)
    started = time.perf_counter()
    files = [Path(directory, f"{tenants}x{chunks}-{t}.kb") for t in range(tenants)]
    stored = sum(file.stat().st_size for file in files)
    indexes = [KnowledgeIndex.from_bytes(file.read_bytes()) for file in files]
    load_s = time.perf_counter() - started
    gc.collect()
    questions = [q.text for a in articles for q in a.questions]
    rng = random.Random(7)
    order = [rng.randrange(tenants) for _ in range(len(questions) * rounds + 50)]
    latency = time_queries(lambda n: indexes[order[n]], questions, rounds)
    rss = rss_bytes()
    return {"tenants": tenants, "chunks_per_tenant": len(indexes[0]),
            "load_ms_per_tenant": round(load_s / tenants * 1000, 2),
            "rss_mib": round(rss / 2**20, 1), "indexes_rss_mib": round((rss - baseline) / 2**20, 1),
            "rss_kib_per_tenant": round((rss - baseline) / tenants / 1024, 1),
            "nbytes_kib_per_tenant": round(statistics.mean(i.nbytes for i in indexes) / 1024, 1),
            "bytes_mib": round(stored / 2**20, 1), **latency}


def scale_runs(runs: Sequence[tuple[int, int]], rounds: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    if not runs:
        return results
    with tempfile.TemporaryDirectory(prefix="kefu-kb-bench-") as directory:
        build_s = in_fresh_process(build_scales, directory, runs)
        print(f"built {build_s}", file=sys.stderr)
        for tenants, chunks in runs:
            served = in_fresh_process(serve_tenants, directory, tenants, chunks, rounds)
            results.append(served | {"build_s": build_s[f"{tenants}x{chunks}"]})
            print(f"scale {tenants} x {chunks}: {results[-1]}", file=sys.stderr)
    return results


def _child(connection: Any, function: str, arguments: tuple[Any, ...]) -> None:
    connection.send(globals()[function](*arguments))
    connection.close()


def in_fresh_process(function: Callable[..., Any], *arguments: Any) -> Any:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, function.__name__, arguments))
    process.start()
    sender.close()
    result = receiver.recv()
    process.join()
    return result
