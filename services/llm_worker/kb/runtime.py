"""Starting and stopping the worker's knowledge base: its NATS connection, store, library, ingestion and seed."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from prometheus_client import CollectorRegistry

from services.common.errors import KefuError
from services.common.nats_client import close_nats, connect_nats
from services.llm_worker.kb.build import IndexBuilder
from services.llm_worker.kb.embeddings import EmbeddingsConfig, QueryEmbedder
from services.llm_worker.kb.ingest import Ingestor, JobQueue
from services.llm_worker.kb.library import KnowledgeLibrary
from services.llm_worker.kb.metrics import KnowledgeMetrics
from services.llm_worker.kb.seed import seed, wait_settled
from services.llm_worker.kb.service import KnowledgeBase
from services.llm_worker.kb.store import KnowledgeStore, Limits
from services.llm_worker.settings import WorkerSettings

log = logging.getLogger(__name__)

SEED_WAIT_S = 60.0
"""How long start-up waits for the seeded documents' ingestion (the first build starts its process)."""


@dataclass
class KnowledgeRuntime:
    base: KnowledgeBase
    library: KnowledgeLibrary
    nc: NatsClient
    builder: IndexBuilder
    embedder: QueryEmbedder | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        await self.library.aclose()
        if self.embedder is not None:
            await self.embedder.aclose()
        await self.builder.aclose()
        await close_nats(self.nc)


def embeddings_config(settings: WorkerSettings) -> EmbeddingsConfig | None:
    """Where chunks and questions are embedded; None without KEFU_EMBEDDINGS_MODEL (BM25 alone)."""
    if not settings.embeddings_model:
        return None
    return EmbeddingsConfig(base_url=settings.openai_base_url, model=settings.embeddings_model,
                            api_key=settings.openai_api_key, batch=settings.embeddings_batch,
                            timeout_s=max(settings.upstream_timeout_s, 10.0),
                            query_timeout_s=settings.embeddings_timeout_s,
                            dimensions=settings.embeddings_dimensions)


async def start_knowledge(settings: WorkerSettings, registry: CollectorRegistry) -> KnowledgeRuntime:
    """Open the buckets, start following tenant indexes and consuming ingestion jobs, then seed."""
    libraries: list[KnowledgeLibrary] = []

    def reconnected() -> None:
        for library in libraries:
            library.reconnected()

    # Its own connection: uploads of megabytes must not queue behind the answer cache's small messages.
    nc = await connect_nats(settings.nats_url, "kefu-llm-worker-kb", reconnected=reconnected)
    try:
        metrics = KnowledgeMetrics(registry)
        store = await KnowledgeStore.open(nc, Limits(settings.kb_max_document_bytes, settings.kb_max_documents,
                                                     settings.kb_max_tenant_bytes), replicas=settings.nats_replicas)
        queue = JobQueue(nc, replicas=settings.nats_replicas)
        await queue.ensure()
        embeddings = embeddings_config(settings)
        embedder = None if embeddings is None else QueryEmbedder(
            embeddings, on_failure=metrics.embedding_failures.labels("query").inc)
        library = KnowledgeLibrary(store, metrics, max_bytes=settings.kb_cache_max_bytes, rebuild=queue.rebuild,
                                   embedder=embedder)
        libraries.append(library)
        await library.start(nc)
    except BaseException:
        await close_nats(nc)
        raise
    builder = IndexBuilder(embeddings)
    base = KnowledgeBase(store, queue, library, metrics)
    runtime = KnowledgeRuntime(base, library, nc, builder, embedder)
    ingestor = Ingestor(store, builder, metrics, published=library.published)
    runtime.tasks.append(asyncio.create_task(ingestor.run(nc), name="kb-ingest"))
    if settings.kb_seed_dir is not None:
        try:
            await _seed(base, settings.kb_seed_dir)
        except BaseException:
            await runtime.aclose()
            raise
    return runtime


async def _seed(base: KnowledgeBase, folder: Path) -> None:
    """Store the seed folder's new or changed files and wait (bounded) for their ingestion, so the worker
    reports SERVING with its seeded tenants answerable (make run's demo answers with citations at once)."""
    try:
        seeded = await seed(base, folder)
    except (KefuError, NatsError, OSError, TimeoutError) as error:
        log.warning("knowledge seed %s failed: %s", folder, error)
        return
    log.info("knowledge seed %s: %d documents stored", folder, len(seeded))
    if seeded and not await wait_settled(base, seeded, SEED_WAIT_S):
        log.warning("knowledge seed %s: not ingested within %.0f s; serving meanwhile", folder, SEED_WAIT_S)
