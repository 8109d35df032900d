"""Ingestion jobs: a JetStream work queue shared by every worker replica, each tenant's index rebuilt once per batch.

A job only says "tenant T changed"; the work is a reconciliation of T's published index with its records
(what to parse, keep, drop), so a job done twice, or redelivered after a crash, changes nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from services.common.nats_client import ensure_stream, fetch_batch
from services.llm_worker.kb.build import BuildResult, IndexBuilder, Outcome, SourceDocument, UnreadableIndex
from services.llm_worker.kb.embeddings import EmbeddingsUnavailable
from services.llm_worker.kb.metrics import KnowledgeMetrics
from services.llm_worker.kb.store import DocumentRecord, IndexState, KnowledgeStore, one_line

log = logging.getLogger(__name__)

JOBS_STREAM = "KEFU_KB_JOBS"
JOBS_SUBJECT = "kefu.kb.jobs"
"""`kefu.kb.jobs.<tenant>`: the tenant's documents changed."""
JOBS_CONSUMER = "kb-ingest"
ACK_WAIT_S = 60.0
"""A job not acked this long after delivery goes to another replica (a crashed one's); in_progress extends it."""
BATCH = 64
MAX_ATTEMPTS = 4
"""Deliveries of a tenant's jobs before its pending documents are marked failed."""
RETRY_DELAY_S = 2.0
BUILD_TIMEOUT_S = 900.0
"""One rebuild (parse, chunk, index) longer than this is stopped (a parser stuck on a hostile file)."""
RECONCILE_TIMEOUT_S = BUILD_TIMEOUT_S + 300.0
"""A tenant's whole reconciliation (its reads, build and writes): past it the job is retried like a failure."""
PUBLISH_ATTEMPTS = 5
PENDING = frozenset({"queued", "indexing"})
REBUILD = b"rebuild"


class JobQueue:
    """The producer side: `enqueue(tenant)` after every stored change."""

    def __init__(self, nc: NatsClient, *, replicas: int = 1) -> None:
        self._js = nc.jetstream(timeout=10)
        self._replicas = replicas

    async def ensure(self) -> None:
        await ensure_stream(self._js, StreamConfig(
            name=JOBS_STREAM, subjects=[f"{JOBS_SUBJECT}.*"], retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE, num_replicas=self._replicas))

    async def enqueue(self, tenant: str, *, rebuild: bool = False) -> None:
        """`rebuild`: parse every document again (the published index cannot be read)."""
        await self._js.publish(f"{JOBS_SUBJECT}.{tenant}", REBUILD if rebuild else b"")

    async def rebuild(self, tenant: str) -> None:
        await self.enqueue(tenant, rebuild=True)


@dataclass(frozen=True, slots=True)
class Plan:
    state: IndexState
    revision: int
    keep: dict[str, int]
    sources: list[SourceDocument]
    records: dict[str, DocumentRecord]
    settled: dict[str, int]
    """Pending records whose version the published index holds already (a build that crashed before it
    could mark them ready): only their records change."""

    @property
    def idle(self) -> bool:
        dropped = set(self.state.documents) - set(self.keep) - {s.document_id for s in self.sources}
        return not self.sources and not dropped and not self.state.removed and not self.settled


class Ingestor:
    """Reconciles tenants' indexes; `run` consumes the job queue until cancelled."""

    def __init__(self, store: KnowledgeStore, builder: IndexBuilder, metrics: KnowledgeMetrics, *,
                 published: Callable[[str, IndexState, int], None] | None = None) -> None:
        self._store = store
        self._builder = builder
        self._metrics = metrics
        self._published = published
        """Told at once of each index this process publishes (its own library need not wait for the watch)."""

    async def run(self, nc: NatsClient, *, fetch_timeout_s: float = 5.0) -> None:
        js = nc.jetstream(timeout=10)
        while True:
            try:
                subscription = await js.pull_subscribe(
                    f"{JOBS_SUBJECT}.*", durable=JOBS_CONSUMER, stream=JOBS_STREAM,
                    config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S))
                try:
                    while True:
                        # None within the timeout: keep this subscription, whose inbox may still get a job.
                        if batch := await fetch_batch(subscription, BATCH, fetch_timeout_s):
                            await self._handle(batch)
                finally:
                    with contextlib.suppress(NatsError, TimeoutError):
                        await subscription.unsubscribe()
            except (NatsError, TimeoutError) as error:
                log.warning("knowledge jobs: %s; retrying", str(error) or type(error).__name__)
                await asyncio.sleep(1.0)

    async def _handle(self, batch: list[Msg]) -> None:
        # Coalesce: every job of a tenant in this batch is one rebuild.
        by_tenant: dict[str, list[Msg]] = {}
        for message in batch:
            by_tenant.setdefault(message.subject.rsplit(".", 1)[-1], []).append(message)
        for tenant, messages in by_tenant.items():
            keepalive = asyncio.create_task(_keep_in_progress(messages), name="kb-job-keepalive")
            try:
                # Bounded: whatever hangs, the keepalive must not hold the job from every other replica forever.
                async with asyncio.timeout(RECONCILE_TIMEOUT_S):
                    await self.reconcile(tenant, rebuild=any(m.data == REBUILD for m in messages))
            except Exception as error:
                self._metrics.ingest_failures.inc()
                if isinstance(error, EmbeddingsUnavailable):
                    self._metrics.embedding_failures.labels("ingest").inc()
                reason = str(error) or type(error).__name__
                if max(m.metadata.num_delivered for m in messages) < MAX_ATTEMPTS:
                    # NATS trouble is worth a retry; anything else is logged with its traceback.
                    expected = isinstance(error, NatsError | TimeoutError | OSError)
                    log.warning("knowledge index of tenant %s not rebuilt: %s; the job is retried", tenant, reason,
                                exc_info=not expected)
                    for message in messages:
                        with contextlib.suppress(NatsError, TimeoutError):
                            await message.nak(delay=RETRY_DELAY_S)
                    continue
                log.warning("knowledge index of tenant %s not rebuilt after %d attempts: %s; its pending "
                            "documents are marked failed", tenant, MAX_ATTEMPTS, reason)
                with contextlib.suppress(Exception):
                    await self._give_up(tenant, type(error).__name__)
            finally:
                keepalive.cancel()
            for message in messages:
                with contextlib.suppress(NatsError, TimeoutError):
                    await message.ack()

    async def _give_up(self, tenant: str, reason: str) -> None:
        """Mark the tenant's pending documents failed, so a document that breaks every build is not retried
        forever (the previous versions keep serving; a new upload tries again)."""
        error = f"ingestion failed {MAX_ATTEMPTS} times ({reason})"
        for record, _ in await self._store.records(tenant):
            if record.status in PENDING:
                def failed(r: DocumentRecord, v: int = record.version) -> DocumentRecord | None:
                    return replace(r, status="failed", error=error, updated_at=time.time()) if r.version == v else None

                await self._store.update_record(tenant, record.document_id, failed)
                self._metrics.documents.labels("failed").inc()

    async def reconcile(self, tenant: str, *, rebuild: bool = False) -> IndexState | None:
        """Make the tenant's published index match its records; the new state, or None when nothing changed.

        `rebuild`: ignore the published index and parse every document again."""
        for _ in range(PUBLISH_ATTEMPTS):
            plan = await self._plan(tenant, trust_index=not rebuild)
            if plan.idle and not (rebuild and plan.state.index):
                return None
            start = time.perf_counter()
            await self._mark_indexing(tenant, plan)
            previous = await self._store.read_index(plan.state.index) if plan.state.index and not rebuild else None
            lost = rebuild or (bool(plan.state.index) and previous is None)
            if lost and not rebuild:
                if (await self._store.state(tenant))[1] != plan.revision:
                    continue  # replaced by a newer build meanwhile (which deleted the old object): plan again
                # The published index is gone from the Object Store: parse every document again.
                log.warning("tenant %s: its knowledge index object is missing; rebuilding from the files", tenant)
                plan = await self._plan(tenant, trust_index=False)
            try:
                result = await self._builder.build(previous, plan.keep, plan.sources, timeout_s=BUILD_TIMEOUT_S)
            except UnreadableIndex as error:
                # Written by another kefu version (or damaged): parse every document again.
                log.warning("tenant %s: its knowledge index is unreadable (%s); rebuilding from the files", tenant,
                            error)
                lost, previous = True, None
                plan = await self._plan(tenant, trust_index=False)
                result = await self._builder.build(None, plan.keep, plan.sources, timeout_s=BUILD_TIMEOUT_S)
            if not lost and result.documents == plan.state.documents and not plan.state.removed:
                # The same documents at the same versions (every new one failed, or a crashed build's
                # records to settle): the published index stays, and so does the knowledge version.
                await self._settle(tenant, plan, result)
                return None
            name = await self._store.write_index(tenant, result.index) if result.index is not None else ""
            state = IndexState(version=plan.state.version + 1, index=name, documents=result.documents)
            revision = await self._store.publish(tenant, state, plan.revision)
            if revision is None:  # another replica (or a delete) changed the tenant meanwhile: plan again
                if name:
                    await self._store.delete_index(name)
                continue
            self._metrics.ingest_seconds.observe(time.perf_counter() - start)
            if self._published is not None:
                self._published(tenant, state, revision)
            await self._settle(tenant, plan, result)
            if plan.state.index:
                await self._store.delete_index(plan.state.index)
            log.info("tenant %s: knowledge version %d, %d documents, %d chunks", tenant, state.version,
                     len(state.documents), result.chunks)
            return state
        log.warning("tenant %s: knowledge index not published after %d attempts (busy tenant); retried by its "
                    "next job", tenant, PUBLISH_ATTEMPTS)
        raise TimeoutError("knowledge index publish kept losing its race")

    async def _plan(self, tenant: str, *, trust_index: bool = True) -> Plan:
        # The state first, then the records: a delete writes them in the other order (see KnowledgeStore.delete).
        state, revision = await self._store.state(tenant)
        records = await self._store.records(tenant)
        keep: dict[str, int] = {}
        sources: list[SourceDocument] = []
        settled: dict[str, int] = {}
        by_id = {record.document_id: record for record, _ in records}
        for record in by_id.values():
            indexed = state.documents.get(record.document_id) if trust_index else None
            if record.serving_version and indexed == record.serving_version:
                keep[record.document_id] = record.serving_version
            if record.status in PENDING:
                if indexed == record.version:
                    settled[record.document_id] = record.version
                    keep[record.document_id] = record.version
                else:
                    source = await self._source(tenant, record, record.version, record.blob)
                    if source is not None:
                        sources.append(source)
            elif record.serving_version and indexed != record.serving_version:
                # The index lost this document (e.g. its object was lost): parse the serving version again.
                source = await self._source(tenant, record, record.serving_version, record.serving_blob)
                if source is not None:
                    sources.append(source)
        return Plan(state, revision, keep, sources, by_id, settled)

    async def _source(self, tenant: str, record: DocumentRecord, version: int, blob: str) -> SourceDocument | None:
        data = await self._store.read_file(blob)
        if data is None:
            return None  # deleted or replaced meanwhile: its own change queued another job
        return SourceDocument(record.document_id, version, record.title, record.url, record.filename,
                              record.format, data)

    async def _mark_indexing(self, tenant: str, plan: Plan) -> None:
        for source in plan.sources:
            def change(record: DocumentRecord, version: int = source.version) -> DocumentRecord | None:
                if record.version != version or record.status != "queued":
                    return None
                return replace(record, status="indexing")
            await self._store.update_record(tenant, source.document_id, change)

    async def _settle(self, tenant: str, plan: Plan, result: BuildResult) -> None:
        """Write each parsed document's outcome into its record (unless a newer version came meanwhile)."""
        now = time.time()
        blobs = {source.document_id: plan.records[source.document_id].blob for source in plan.sources
                 if source.version == plan.records[source.document_id].version}
        for document_id, outcome in result.outcomes.items():
            blob = blobs.get(document_id, "")
            before = plan.records.get(document_id)
            def settled(record: DocumentRecord, o: Outcome = outcome, b: str = blob) -> DocumentRecord | None:
                return outcome_record(record, o, b, now)

            after = await self._store.update_record(tenant, document_id, settled)
            if after is None:
                continue
            self._metrics.documents.labels(after.status).inc()
            if outcome.error:
                log.warning("tenant %s: document %s version %d failed: %s", tenant, document_id, outcome.version,
                            outcome.error)
            elif before is not None and before.serving_blob and before.serving_blob != after.serving_blob:
                await self._store.delete_file(before.serving_blob)
        for document_id, version in plan.settled.items():
            def settle(record: DocumentRecord, version: int = version) -> DocumentRecord | None:
                if record.version != version or record.status not in PENDING:
                    return None
                return replace(record, status="ready", error="", serving_version=version, serving_blob=record.blob,
                               updated_at=now)
            await self._store.update_record(tenant, document_id, settle)


def outcome_record(record: DocumentRecord, outcome: Outcome, blob: str, now: float) -> DocumentRecord | None:
    """The record after a build parsed `outcome.version` of it (`blob`: that version's file); None: no change."""
    if outcome.error:
        if record.version != outcome.version:
            return None  # a newer version came meanwhile: its own build reports on it
        return replace(record, status="failed", error=one_line(outcome.error), updated_at=now)
    if record.version == outcome.version:
        return replace(record, status="ready", error="", serving_version=outcome.version, serving_blob=record.blob,
                       chunks=outcome.chunks, title=outcome.title, updated_at=now)
    if record.serving_version >= outcome.version or not blob:
        return None
    # A newer version is queued: this one serves meanwhile.
    return replace(record, serving_version=outcome.version, serving_blob=blob, chunks=outcome.chunks,
                   title=outcome.title)


async def _keep_in_progress(messages: list[Msg], every_s: float = ACK_WAIT_S / 3) -> None:
    """Tell JetStream the jobs are being worked on, so a long build is not redelivered to another replica."""
    while True:
        await asyncio.sleep(every_s)
        for message in messages:
            with contextlib.suppress(NatsError, TimeoutError):
                await message.in_progress()
