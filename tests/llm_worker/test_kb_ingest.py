"""The knowledge store, ingestion and library against a real nats-server (the build process is real too)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

from devtools.devstack.nats_server import NatsServer, start_nats_server
from services.common.errors import NotFound, Unavailable
from services.common.nats_client import connect_nats
from services.llm_worker.kb.build import IndexBuilder, SourceDocument
from services.llm_worker.kb.ingest import ACK_WAIT_S, JOBS_CONSUMER, JOBS_STREAM, Ingestor, JobQueue
from services.llm_worker.kb.library import KnowledgeLibrary
from services.llm_worker.kb.metrics import KnowledgeMetrics
from services.llm_worker.kb.seed import seed, wait_settled
from services.llm_worker.kb.service import KnowledgeBase
from services.llm_worker.kb.store import FILES_BUCKET, KnowledgeStore, Limits, QuotaExceeded
from services.llm_worker.knowledge.parsing import UnsupportedFormat

SHIPPING = b"# Shipping\n\nOrders ship within 48 hours. Shipping is free over 99 yuan.\n"
RETURNS = b"# Returns\n\nUnopened tea may be returned within 7 days for a full refund.\n"


@pytest.fixture(scope="module")
def builder() -> Iterator[IndexBuilder]:
    # One build process for the module: starting one (spawn, imports) takes a second or two.
    built = IndexBuilder()
    try:
        yield built
    finally:
        executor = built._executor
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass
class Kb:
    base: KnowledgeBase
    store: KnowledgeStore
    library: KnowledgeLibrary
    ingestor: Ingestor
    metrics: KnowledgeMetrics


async def open_kb(nc: NatsClient, builder: IndexBuilder, limits: Limits | None = None,
                  max_bytes: int = 1 << 30) -> Kb:
    metrics = KnowledgeMetrics()
    store = await KnowledgeStore.open(nc, limits or Limits())
    queue = JobQueue(nc)
    await queue.ensure()
    library = KnowledgeLibrary(store, metrics, max_bytes=max_bytes, rebuild=queue.rebuild)
    await library.start(nc)
    ingestor = Ingestor(store, builder, metrics, published=library.published)
    return Kb(KnowledgeBase(store, queue, library, metrics), store, library, ingestor, metrics)


@pytest.fixture
async def kb(nats_client: NatsClient, builder: IndexBuilder) -> AsyncIterator[Kb]:
    opened = await open_kb(nats_client, builder)
    try:
        yield opened
    finally:
        await opened.library.aclose()


async def put(kb: Kb, tenant: str, document_id: str, data: bytes, filename: str = "page.md", **fields: str) -> None:
    await kb.base.put(tenant, document_id=document_id, title=fields.get("title", ""), url=fields.get("url", ""),
                      filename=filename, content_type="", data=data)


async def texts(kb: Kb, tenant: str, query: str) -> list[str]:
    return [hit.chunk.text for hit in await kb.library.search(tenant, query, 5)]


async def test_kb_put_reconcile_makes_a_ready_searchable_document(kb: Kb) -> None:
    await put(kb, "shop1", "shipping", SHIPPING, url="https://shop.example/shipping")
    queued = await kb.store.get("shop1", "shipping")
    assert (queued.status, queued.version, queued.serving_version) == ("queued", 1, 0)
    assert (await kb.library.snapshot("shop1")).index is None

    state = await kb.ingestor.reconcile("shop1")
    assert state is not None and state.documents == {"shipping": 1}
    record = await kb.store.get("shop1", "shipping")
    assert (record.status, record.serving_version, record.error) == ("ready", 1, "")
    assert record.chunks >= 1 and record.title == "Shipping"
    hits = await kb.library.search("shop1", "how fast do orders ship", 3)
    assert hits and hits[0].chunk.document_id == "shipping"
    assert hits[0].chunk.url == "https://shop.example/shipping"
    assert await kb.ingestor.reconcile("shop1") is None  # nothing left to do


async def test_kb_a_broken_version_fails_alone_and_the_previous_one_keeps_serving(kb: Kb) -> None:
    await put(kb, "shop1", "shipping", SHIPPING)
    await put(kb, "shop1", "returns", RETURNS)
    await kb.ingestor.reconcile("shop1")
    version = (await kb.library.snapshot("shop1")).version
    await put(kb, "shop1", "shipping", b"this is not a PDF at all", filename="shipping.pdf")
    assert await kb.ingestor.reconcile("shop1") is None  # nothing new to serve: the same index, same version
    assert (await kb.library.snapshot("shop1")).version == version
    record = await kb.store.get("shop1", "shipping")
    assert (record.status, record.version, record.serving_version) == ("failed", 2, 1)
    assert "PDF" in record.error and "\n" not in record.error
    assert (await kb.store.get("shop1", "returns")).status == "ready"
    assert any("48 hours" in text for text in await texts(kb, "shop1", "orders ship hours"))
    # A tenant whose only document fails keeps knowledge version 0 (no documents to answer from).
    await put(kb, "shop3", "broken", b"%PDF-1.4 broken", filename="broken.pdf")
    await kb.ingestor.reconcile("shop3")
    assert (await kb.store.get("shop3", "broken")).status == "failed"
    assert (await kb.library.snapshot("shop3")).version == 0


async def test_kb_a_new_version_replaces_the_old_text(kb: Kb) -> None:
    await put(kb, "shop1", "shipping", SHIPPING)
    await kb.ingestor.reconcile("shop1")
    before = await kb.library.snapshot("shop1")
    await put(kb, "shop1", "shipping", b"# Shipping\n\nOrders ship within 5 days by sea freight.\n")
    await kb.ingestor.reconcile("shop1")
    found = await texts(kb, "shop1", "orders ship")
    assert any("sea freight" in text for text in found) and not any("48 hours" in t for t in found)
    # A turn that took its snapshot before keeps its index.
    assert any("48 hours" in hit.chunk.text for hit in before.search("orders ship"))
    after = await kb.library.snapshot("shop1")
    assert after.version > before.version


async def test_kb_delete_stops_retrieval_at_once_before_the_rebuild(kb: Kb) -> None:
    await put(kb, "shop1", "shipping", SHIPPING)
    await put(kb, "shop1", "returns", RETURNS)
    await kb.ingestor.reconcile("shop1")
    version = (await kb.library.snapshot("shop1")).version
    await kb.base.delete("shop1", "shipping")
    snapshot = await kb.library.snapshot("shop1")
    assert snapshot.version > version  # answer caches keyed on it miss at once
    assert all(hit.chunk.document_id != "shipping" for hit in snapshot.search("shipping orders hours", 10))
    retrieval = snapshot.retrieve("how fast do orders ship?")
    assert all(hit.chunk.document_id != "shipping" for hit in retrieval.hits)
    with pytest.raises(NotFound):
        await kb.store.get("shop1", "shipping")
    with pytest.raises(NotFound):
        await kb.base.delete("shop1", "shipping")
    state = await kb.ingestor.reconcile("shop1")
    assert state is not None and state.documents == {"returns": 1} and state.removed == ()
    assert (await texts(kb, "shop1", "refund")) and not await texts(kb, "shop1", "48 hours shipping")


async def test_kb_another_replica_sees_a_new_index_through_its_watch(kb: Kb, nats_client: NatsClient,
                                                                   builder: IndexBuilder) -> None:
    other = await open_kb(nats_client, builder)
    try:
        assert (await other.library.snapshot("shop1")).index is None  # remembered: no documents
        await put(kb, "shop1", "shipping", SHIPPING)
        state = await kb.ingestor.reconcile("shop1")
        assert state is not None
        for _ in range(200):
            if (await other.library.snapshot("shop1")).version == state.version:
                break
            await asyncio.sleep(0.01)
        snapshot = await other.library.snapshot("shop1")
        assert snapshot.version == state.version and snapshot.search("orders ship")
        await kb.base.delete("shop1", "shipping")  # seen by the other replica without a rebuild
        for _ in range(200):
            if "shipping" in (await other.library.snapshot("shop1")).removed:
                break
            await asyncio.sleep(0.01)
        assert not (await other.library.snapshot("shop1")).search("orders ship")
    finally:
        await other.library.aclose()


async def test_kb_tenants_never_see_each_others_documents(kb: Kb) -> None:
    await put(kb, "shop1", "shipping", SHIPPING)
    await kb.ingestor.reconcile("shop1")
    await kb.ingestor.reconcile("shop2")
    assert (await kb.library.snapshot("shop2")).index is None
    assert await kb.library.search("shop2", "orders ship", 5) == []
    with pytest.raises(NotFound):
        await kb.base.get("shop2", "shipping")
    with pytest.raises(NotFound):
        await kb.base.delete("shop2", "shipping")
    assert (await kb.base.list("shop2")).documents == []
    assert (await kb.store.get("shop1", "shipping")).status == "ready"


async def test_kb_quotas_refuse_past_the_limits(nats_client: NatsClient, builder: IndexBuilder) -> None:
    kb = await open_kb(nats_client, builder, Limits(max_document_bytes=1000, max_documents=2, max_tenant_bytes=300))
    try:
        await put(kb, "shop1", "a", b"a" * 100)
        await put(kb, "shop1", "b", b"b" * 100)
        with pytest.raises(QuotaExceeded) as documents:
            await put(kb, "shop1", "c", b"c" * 10)
        assert documents.value.limit == "KEFU_KB_MAX_DOCUMENTS"
        with pytest.raises(QuotaExceeded) as size:
            await put(kb, "shop1", "a", b"a" * 250)  # a new version of an existing document
        assert size.value.limit == "KEFU_KB_MAX_TENANT_BYTES"
        await kb.base.delete("shop1", "b")
        await put(kb, "shop1", "c", b"c" * 10)  # room again after a delete
        assert (await kb.store.usage("shop1"))[0].documents == 2
        await put(kb, "shop2", "a", b"a" * 100)  # limits are per tenant
    finally:
        await kb.library.aclose()


async def test_kb_an_unsupported_format_is_refused_before_storing(kb: Kb) -> None:
    with pytest.raises(UnsupportedFormat):
        await put(kb, "shop1", "x", b"\x00\x01", filename="photo.png")
    assert (await kb.base.list("shop1")).documents == []


async def test_kb_list_pages_by_cursor(kb: Kb) -> None:
    for n in range(5):
        await put(kb, "shop1", f"doc{n}", f"# Page {n}\n\ntext {n}\n".encode())
    first = await kb.base.list("shop1", limit=2)
    assert [r.document_id for r in first.documents] == ["doc0", "doc1"] and first.next_cursor
    second = await kb.base.list("shop1", limit=2, cursor=first.next_cursor)
    third = await kb.base.list("shop1", limit=2, cursor=second.next_cursor)
    assert [r.document_id for r in second.documents + third.documents] == ["doc2", "doc3", "doc4"]
    assert third.next_cursor == ""


async def test_kb_jobs_coalesce_and_two_racing_replicas_both_land(kb: Kb, nats_client: NatsClient,
                                                                 builder: IndexBuilder) -> None:
    other = await open_kb(nats_client, builder)
    try:
        for n in range(4):
            await put(kb, "shop1", f"doc{n}", f"# Topic {n}\n\nunique{n} words here\n".encode())
        run = asyncio.create_task(kb.ingestor.run(nats_client, fetch_timeout_s=0.5))
        for _ in range(600):
            records = [r for r, _ in await kb.store.records("shop1")]
            if all(r.status == "ready" for r in records):
                break
            await asyncio.sleep(0.05)
        state, _ = await kb.store.state("shop1")
        assert state.documents == {f"doc{n}": 1 for n in range(4)}
        assert state.version <= 2  # four jobs, one or two builds (the first fetch may have come early)
        # Two replicas reconciling at once: the compare-and-set makes the loser plan again.
        run.cancel()
        await asyncio.wait([run])
        await put(kb, "shop1", "doc0", b"# Topic 0\n\nreplaced words\n")
        await put(kb, "shop1", "doc9", b"# Topic 9\n\nninth words\n")
        await asyncio.gather(kb.ingestor.reconcile("shop1"), other.ingestor.reconcile("shop1"))
        state, _ = await kb.store.state("shop1")
        assert state.documents["doc0"] == 2 and state.documents["doc9"] == 1
        assert (await kb.store.get("shop1", "doc9")).status == "ready"
    finally:
        await other.library.aclose()


async def test_kb_seed_is_idempotent(kb: Kb, tmp_path: Path) -> None:
    folder = tmp_path / "seed"
    (folder / "demo").mkdir(parents=True)
    (folder / "demo" / "shipping policy.md").write_bytes(SHIPPING)
    (folder / "demo" / ".hidden").write_bytes(b"x")
    (folder / "not a tenant").mkdir()
    first = await seed(kb.base, folder)
    assert [(s.tenant, s.document_id, s.version) for s in first] == [("demo", "shipping-policy", 1)]
    assert not await wait_settled(kb.base, first, 0.2)  # nobody ingests it yet
    await kb.ingestor.reconcile("demo")
    assert await wait_settled(kb.base, first, 5)
    assert await seed(kb.base, folder) == []  # unchanged
    (folder / "demo" / "shipping policy.md").write_bytes(SHIPPING + b"\nAlso by express.\n")
    assert len(await seed(kb.base, folder)) == 1
    record = await kb.store.get("demo", "shipping-policy")
    assert record.version == 2 and record.filename == "shipping policy.md"


async def test_kb_library_lru_stays_within_its_bytes(nats_client: NatsClient, builder: IndexBuilder) -> None:
    kb = await open_kb(nats_client, builder, max_bytes=1)
    try:
        for tenant in ("t1", "t2", "t3"):
            await put(kb, tenant, "doc", SHIPPING)
            await kb.ingestor.reconcile(tenant)
            assert await kb.library.search(tenant, "orders ship", 3)
        assert len(kb.library._indexes) == 1 and "t3" in kb.library._indexes
        assert kb.metrics.evictions._value.get() == 2
        assert await kb.library.search("t1", "orders ship", 3)  # loaded again on demand
    finally:
        await kb.library.aclose()


async def test_kb_a_build_past_its_timeout_is_stopped_and_the_next_runs() -> None:
    builder = IndexBuilder()
    source = SourceDocument("doc", 1, "", "", "page.md", "markdown", SHIPPING)
    try:
        with pytest.raises(TimeoutError):
            await builder.build(None, {}, [source], timeout_s=0.01)  # still starting its process
        result = await builder.build(None, {}, [source], timeout_s=60)
        assert result.documents == {"doc": 1} and result.outcomes["doc"].chunks >= 1
    finally:
        await builder.aclose()


async def test_kb_library_follows_updates_after_nats_restarts(nats_server: NatsServer, builder: IndexBuilder,
                                                             tmp_path: Path) -> None:
    libraries: list[KnowledgeLibrary] = []
    # As the worker wires it (kb.runtime): the client's reconnect tells the library.
    def reconnected() -> None:
        for library in libraries:
            library.reconnected()

    runtime_nc = await connect_nats(nats_server.url, "test-library", reconnected=reconnected)
    writer_nc = await connect_nats(nats_server.url, "test-writer")
    reader = await open_kb(runtime_nc, builder)
    libraries.append(reader.library)
    writer = await open_kb(writer_nc, builder)
    try:
        await put(writer, "shop1", "shipping", SHIPPING)
        await writer.ingestor.reconcile("shop1")
        assert (await reader.library.snapshot("shop1")).search("orders ship")
        port = int(nats_server.url.rsplit(":", 1)[1])
        nats_server.stop()
        restarted = start_nats_server(nats_server.store_dir, port=port)
        nats_server.process = restarted.process  # the fixture stops whichever runs
        for _ in range(100):  # both clients back, and JetStream answering (it recovers its store first)
            try:
                if runtime_nc.is_connected and writer_nc.is_connected:
                    await writer_nc.jetstream(timeout=0.5).account_info()
                    await writer.store.state("shop1")
                    break
            except (NatsError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
        await put(writer, "shop1", "returns", RETURNS)
        state = await writer.ingestor.reconcile("shop1")
        assert state is not None
        for _ in range(200):
            if (await reader.library.snapshot("shop1")).version == state.version:
                break
            await asyncio.sleep(0.05)
        assert [h.chunk.document_id for h in (await reader.library.snapshot("shop1")).search("refund")] == ["returns"]
    finally:
        await reader.library.aclose()
        await writer.library.aclose()
        await runtime_nc.close()
        await writer_nc.close()


async def test_kb_a_lost_index_object_is_rebuilt_from_the_files_by_the_next_job(kb: Kb) -> None:
    await put(kb, "shop1", "shipping", SHIPPING)
    await kb.ingestor.reconcile("shop1")
    state, _ = await kb.store.state("shop1")
    await kb.store.delete_index(state.index)  # lost (an operator purged the bucket, a restore without it...)
    await put(kb, "shop1", "returns", RETURNS)
    rebuilt = await kb.ingestor.reconcile("shop1")
    assert rebuilt is not None and rebuilt.documents == {"shipping": 1, "returns": 1}
    assert await texts(kb, "shop1", "orders ship hours") and await texts(kb, "shop1", "refund")


async def test_kb_an_unreadable_index_fails_turns_as_retryable_and_gets_rebuilt(kb: Kb,
                                                                               nats_client: NatsClient) -> None:
    await put(kb, "shop1", "shipping", SHIPPING)
    await kb.ingestor.reconcile("shop1")
    # An index another kefu version wrote (or damaged bytes) under a new name, published as the tenant's.
    state, revision = await kb.store.state("shop1")
    name = await kb.store.write_index("shop1", b"PK\x03\x04 not an index of this version")
    assert await kb.store.publish("shop1", dataclasses.replace(state, version=state.version + 1, index=name),
                                  revision)
    fresh = await open_kb(nats_client, IndexBuilder())  # a replica that has not loaded the good one
    run = asyncio.create_task(kb.ingestor.run(nats_client, fetch_timeout_s=0.5))
    try:
        with pytest.raises(Unavailable):
            await fresh.library.snapshot("shop1")
        for _ in range(300):  # the rebuild it asked for: every document parsed again
            try:
                if (await fresh.library.snapshot("shop1")).search("orders ship"):
                    break
            except Unavailable:
                pass
            await asyncio.sleep(0.05)
        knowledge = await fresh.library.snapshot("shop1")
        assert knowledge.search("orders ship") and knowledge.version == state.version + 2
    finally:
        run.cancel()
        await asyncio.wait([run])
        await fresh.library.aclose()


async def test_kb_a_build_on_an_unreadable_index_parses_every_document_again(kb: Kb) -> None:
    await put(kb, "shop1", "shipping", SHIPPING)
    await kb.ingestor.reconcile("shop1")
    state, revision = await kb.store.state("shop1")
    name = await kb.store.write_index("shop1", b"not an index")
    assert await kb.store.publish("shop1", dataclasses.replace(state, index=name), revision)
    await put(kb, "shop1", "returns", RETURNS)
    rebuilt = await kb.ingestor.reconcile("shop1")
    assert rebuilt is not None and rebuilt.documents == {"shipping": 1, "returns": 1}
    assert await texts(kb, "shop1", "orders ship hours") and await texts(kb, "shop1", "refund")


@pytest.mark.timeout(240)  # the queue may take ACK_WAIT_S to empty (below)
def task_stacks(tasks: list[asyncio.Task[None]]) -> str:
    """Each task's stack and whether a job keepalive is running: what a failure needs to say where a job waits."""
    out = io.StringIO()
    for task in tasks:
        task.print_stack(file=out)
    keepalives = [t for t in asyncio.all_tasks() if t.get_name() == "kb-job-keepalive"]
    return f"{len(keepalives)} keepalive(s) running\n{out.getvalue()}"


async def test_kb_two_replicas_share_the_job_queue(kb: Kb, nats_client: NatsClient, builder: IndexBuilder) -> None:
    other = await open_kb(nats_client, builder)
    runs = [asyncio.create_task(replica.ingestor.run(nats_client, fetch_timeout_s=0.3)) for replica in (kb, other)]
    try:
        for tenant in ("t1", "t2", "t3"):
            for n in range(3):
                await put(kb if n % 2 else other, tenant, f"doc{n}", f"# {tenant} {n}\n\nword{tenant}{n}\n".encode())
        for _ in range(600):
            records = [r for tenant in ("t1", "t2", "t3") for r, _ in await kb.store.records(tenant)]
            if len(records) == 9 and all(r.status == "ready" for r in records):
                break
            await asyncio.sleep(0.05)
        for tenant in ("t1", "t2", "t3"):
            state, _ = await kb.store.state(tenant)
            assert state.documents == {f"doc{n}": 1 for n in range(3)}, tenant
            for n in range(3):  # either replica's library serves every document
                for replica in (kb, other):
                    hits = await replica.library.search(tenant, f"word{tenant}{n}", 1)
                    assert hits and hits[0].chunk.document_id == f"doc{n}"
        # A work queue: every job acked (after its records were settled), none left. A job delivered to a
        # replica while its records were being settled by the other is reconciled again (idle) before its ack,
        # which on a loaded machine can take seconds. A job the server handed to a pull its replica had
        # given up on (seen once in a full run: acked by nobody, both replicas waiting) is delivered again
        # after ACK_WAIT_S: that is the queue's own recovery, so the wait covers it.
        js = nats_client.jetstream()
        deadline = time.monotonic() + ACK_WAIT_S + 30
        while time.monotonic() < deadline:
            if (await js.stream_info(JOBS_STREAM)).state.messages == 0:
                break
            await asyncio.sleep(0.05)
        consumer = await js.consumer_info(JOBS_STREAM, JOBS_CONSUMER)
        assert (await js.stream_info(JOBS_STREAM)).state.messages == 0, (
            f"unacked {consumer.num_ack_pending}, undelivered {consumer.num_pending}, "
            f"redelivered {consumer.num_redelivered}, waiting pulls {consumer.num_waiting}; "
            f"where the ingestors are: {task_stacks(runs)}")
    finally:
        for run in runs:
            run.cancel()
        await asyncio.wait(runs)
        await other.library.aclose()


async def purge_file_chunks(nc: NatsClient, blob: str) -> None:
    """Leave the file's object listed with its size but without its bytes (purged, aged out)."""
    js = nc.jetstream()
    info = await (await js.object_store(FILES_BUCKET)).get_info(blob)
    await js.purge_stream(f"OBJ_{FILES_BUCKET}", subject=f"$O.{FILES_BUCKET}.C.{info.nuid}")


async def test_kb_a_file_without_its_bytes_fails_its_jobs_instead_of_holding_them(
        kb: Kb, nats_client: NatsClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # nats-py waits on such an object's chunks without a deadline: the job's keepalive would then hold the job
    # from every replica, forever. The read gives up; the job is retried, then its document is marked failed.
    monkeypatch.setattr("services.llm_worker.kb.ingest.RETRY_DELAY_S", 0.2)
    kb.store.object_timeout_s = 0.5
    await put(kb, "shop5", "lost", SHIPPING)
    await purge_file_chunks(nats_client, (await kb.store.get("shop5", "lost")).blob)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="not read within 0.5 s"):
        await kb.store.read_file((await kb.store.get("shop5", "lost")).blob)
    assert time.monotonic() - started < 5
    run = asyncio.create_task(kb.ingestor.run(nats_client, fetch_timeout_s=0.3))
    try:
        for _ in range(600):
            if (await kb.store.get("shop5", "lost")).status == "failed":
                break
            await asyncio.sleep(0.05)
        record = await kb.store.get("shop5", "lost")
        assert record.status == "failed" and "TimeoutError" in record.error, record
        js = nats_client.jetstream()
        for _ in range(100):  # the last attempt's ack follows the record's update
            if (await js.stream_info(JOBS_STREAM)).state.messages == 0:
                break
            await asyncio.sleep(0.05)
        assert (await js.stream_info(JOBS_STREAM)).state.messages == 0
    finally:
        run.cancel()
        await asyncio.wait([run])
