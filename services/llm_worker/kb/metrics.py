"""Prometheus metrics of the knowledge base, on the worker's registry; never labelled by tenant."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

INGEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass
class KnowledgeMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.documents = Counter(
            "kefu_kb_documents", "Document changes by what became of them: stored (queued), ready, failed, deleted.",
            ["status"], registry=self.registry)
        self.ingest_seconds = Histogram(
            "kefu_kb_ingest_duration_seconds", "Time to parse, chunk and index one tenant's pending documents "
            "and publish the index.", registry=self.registry, buckets=INGEST_BUCKETS)
        self.ingest_failures = Counter(
            "kefu_kb_ingest_failures", "Index builds that failed (retried from the job queue).",
            registry=self.registry)
        self.cache_bytes = Gauge(
            "kefu_kb_index_cache_bytes", "Approximate bytes of the tenant indexes this process holds.",
            registry=self.registry)
        self.cache_indexes = Gauge(
            "kefu_kb_index_cache_indexes", "Tenant indexes this process holds.", registry=self.registry)
        self.loads = Counter(
            "kefu_kb_index_loads", "Tenant indexes loaded from the Object Store, by result (ok, error).",
            ["result"], registry=self.registry)
        self.load_seconds = Histogram(
            "kefu_kb_index_load_duration_seconds", "Time to fetch and open a tenant index.",
            registry=self.registry, buckets=LOAD_BUCKETS)
        self.embedding_failures = Counter(
            "kefu_kb_embedding_failures", "Embedding requests that failed, by stage: query (that turn retrieved "
            "with BM25 alone) or ingest (that rebuild failed and is retried).", ["stage"], registry=self.registry)
        self.evictions = Counter(
            "kefu_kb_index_evictions", "Tenant indexes dropped to stay within KEFU_KB_CACHE_MAX_BYTES.",
            registry=self.registry)
