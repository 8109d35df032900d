"""`python -m bench.kb_ingest_bench`: knowledge ingestion and search through the HTTP API of the real stack.

Starts the whole system (nats-server, the services, the edge) on free ports, then:

- uploads every CMRC 2018 trial article (bench/data/, 256 Chinese passages) as one document
  (`POST /v1/knowledge/documents`, JSON text, `--concurrency` at once) and waits until every one is
  `ready`: documents per second from the first upload to the last `ready`, and the worker's own
  rebuild figures (kefu_kb_ingest_duration_seconds: how many rebuilds the jobs coalesced into);
- uploads one large Markdown document (`--large-mb`) into another tenant: seconds to `ready`;
- searches every question (`POST /v1/knowledge/search`): latency p50/p99 through the edge.

Results: a table on stdout and bench/results/kb-ingest-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.loadgen import rank_percentile
from devtools.devstack.stack import Stack, StackConfig, StackPorts
from devtools.mint_token import mint

DATA = Path(__file__).resolve().parent / "data" / "cmrc2018_trial.json"
RESULTS = Path(__file__).resolve().parent / "results"
SECRET = "bench-kb-ingest-secret-that-is-long-enough"


def articles() -> list[tuple[str, str, list[str]]]:
    """(title, context, questions) per CMRC article."""
    found = []
    for entry in json.loads(DATA.read_text(encoding="utf-8"))["data"]:
        for paragraph in entry["paragraphs"]:
            found.append((entry.get("title", paragraph["id"]), paragraph["context"],
                          [qa["question"] for qa in paragraph["qas"]]))
    return found


def headers(tenant: str, role: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(SECRET, tenant=tenant, subject='bench', role=role, ttl_s=3600)}"}


async def wait_ready(http: aiohttp.ClientSession, base: str, tenant: str, count: int, timeout_s: float) -> float:
    """Poll the list until `count` documents are ready (failed ones count as settled); the time it happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with http.get(f"{base}/v1/knowledge/documents?limit=1000", headers=headers(tenant)) as response:
            documents = (await response.json())["documents"]
        if len(documents) >= count and all(d["status"] in ("ready", "failed") for d in documents):
            return time.perf_counter()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{tenant}: documents not ready within {timeout_s} s")


def worker_histogram(port: int, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram on the worker's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith(f"{name}_sum") or line.startswith(f"{name}_count")}
    return values.get(f"{name}_sum", 0.0), values.get(f"{name}_count", 0.0)


async def run(stack: Stack, concurrency: int, large_mb: float) -> dict[str, Any]:
    base = stack.base_url
    corpus = articles()
    limit = asyncio.Semaphore(concurrency)
    chunks = 0
    async with aiohttp.ClientSession() as http:
        async def upload(n: int, title: str, text: str) -> None:
            async with limit, http.post(f"{base}/v1/knowledge/documents", headers=headers("cmrc"),
                                        json={"document_id": f"a{n}", "title": title, "text": text}) as response:
                assert response.status == 202, await response.text()

        started = time.perf_counter()
        await asyncio.gather(*(upload(n, title, text) for n, (title, text, _) in enumerate(corpus)))
        uploaded = time.perf_counter()
        ready = await wait_ready(http, base, "cmrc", len(corpus), 600)
        async with http.get(f"{base}/v1/knowledge/documents?limit=1000", headers=headers("cmrc")) as response:
            listed = (await response.json())["documents"]
        chunks = sum(d["chunks"] for d in listed)
        rebuild_s, rebuilds = worker_histogram(stack.config.ports.worker_metrics, "kefu_kb_ingest_duration_seconds")

        paragraph = "退货政策：未拆封商品收货后7天内可退。" * 20 + "\n\n"
        large = ("# Large manual\n\n" + "".join(f"## Section {n}\n\n{paragraph}" for n in range(
            int(large_mb * 1024 * 1024 / (len(paragraph.encode()) + 20))))).encode()
        large_started = time.perf_counter()
        async with http.post(f"{base}/v1/knowledge/documents", headers=headers("large"),
                             json={"document_id": "manual", "text": large.decode()}) as response:
            assert response.status == 202, await response.text()
        large_stored = time.perf_counter()
        large_ready = await wait_ready(http, base, "large", 1, 600)
        async with http.get(f"{base}/v1/knowledge/documents/manual", headers=headers("large")) as response:
            large_doc = await response.json()

        questions = [q for _, _, qs in corpus for q in qs][:500]
        latencies = []
        agent = headers("cmrc", "agent")
        for question in questions:
            t0 = time.perf_counter()
            async with http.post(f"{base}/v1/knowledge/search", headers=agent,
                                 json={"query": question, "k": 5}) as response:
                assert response.status == 200
                await response.read()
            latencies.append(time.perf_counter() - t0)
    return {
        "documents": len(corpus), "chunks": chunks, "upload_s": round(uploaded - started, 3),
        "to_ready_s": round(ready - started, 3), "documents_per_s": round(len(corpus) / (ready - started), 1),
        "chunks_per_s": round(chunks / (ready - started), 1), "rebuilds": int(rebuilds),
        "rebuild_s_total": round(rebuild_s, 3),
        "large_document_bytes": len(large), "large_chunks": large_doc["chunks"],
        "large_store_s": round(large_stored - large_started, 3),
        "large_to_ready_s": round(large_ready - large_started, 3),
        "search_queries": len(latencies), "search_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "search_p99_ms": round(rank_percentile(latencies, 0.99) * 1000, 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8, help="uploads in flight")
    parser.add_argument("--large-mb", type=float, default=5.0, help="size of the one large document")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kefu-kb-ingest-") as data_dir:
        stack = Stack(StackConfig(data_dir=Path(data_dir), jwt_secret=SECRET, ports=StackPorts.free(),
                                  env={"KEFU_RATE_LIMIT_RPS": "100000", "KEFU_RATE_LIMIT_BURST": "100000",
                                       "KEFU_LOG_LEVEL": "WARNING"}, log_dir=Path(data_dir) / "logs"))
        stack.start()
        try:
            figures = asyncio.run(run(stack, args.concurrency, args.large_mb))
        finally:
            stack.stop()
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"kb-ingest-{stamp}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("| figure | value |\n|---|---|")
    for name, value in figures.items():
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
