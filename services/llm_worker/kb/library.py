"""The tenant indexes answers use, in this process: loaded on demand into a byte-bounded LRU, kept fresh by a watch.

Use:

    knowledge = await library.snapshot(tenant)   # one per turn; never fails for lack of documents
    if knowledge.index is not None:
        retrieval = await knowledge.retrieve_fused(question, previous_user_turns=earlier, k=5)

A snapshot is immutable: a turn that took one finishes on it while newer indexes arrive. Its `version`
changes whenever what may be retrieved changes (a new index, a deleted document), so it belongs in
answer cache keys. Always retrieve through the snapshot (`retrieve`, `search`), never on `index`
directly: a deleted document stays inside `index` until the next build, and only the snapshot
drops its hits.

With KEFU_EMBEDDINGS_MODEL, `retrieve_fused` and `search_fused` also embed the query (one upstream request,
cached) and fuse the cosine ranking of the index's chunk vectors with BM25's (knowledge.fusion); without it,
or when the embedding fails, they are `retrieve` and `search`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.common.errors import Unavailable
from services.llm_worker.kb.embeddings import QueryVectors
from services.llm_worker.kb.metrics import KnowledgeMetrics
from services.llm_worker.kb.store import DEL_OPERATIONS, TENANTS_BUCKET, IndexState, KnowledgeStore
from services.llm_worker.knowledge.fusion import fuse
from services.llm_worker.knowledge.index import IndexFormatError, KnowledgeIndex
from services.llm_worker.knowledge.models import Chunk, Hit, Retrieval
from services.llm_worker.knowledge.retrieval import retrieve

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0

MAX_TENANT_STATES = 100_000
"""Tenant states remembered (a few hundred bytes each); the indexes themselves are bounded by bytes."""
WATCH_SUBJECT = f"$KV.{TENANTS_BUCKET}.*.index"


@dataclass(frozen=True, slots=True)
class TenantKnowledge:
    """What one turn of a tenant answers from."""

    tenant: str
    version: int
    """Knowledge version: 0 when the tenant never had documents; changes with every index and every delete."""
    index: KnowledgeIndex | None
    """None when the tenant has no indexed chunk (no documents, all deleted, or none parsed yet)."""
    removed: frozenset[str] = field(default_factory=frozenset)
    """Documents deleted since `index` was built; their hits are dropped."""
    embedder: QueryVectors | None = None
    """Embeds queries for dense retrieval (None: BM25 alone)."""

    def retrieve(self, question: str, *, previous_user_turns: Sequence[str] = (), k: int = 5) -> Retrieval:
        """The passages for a visitor's question (follow-ups resolved against the earlier turns)."""
        if self.index is None:
            return Retrieval(hits=(), answerable=False, query=question)
        return retrieve(self._live(), question, previous_user_turns=previous_user_turns, k=k)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The best `k` passages for a query, without the answer-or-hand-off decision."""
        if self.index is None:
            return []
        return list(self._live().search(query, k))

    @property
    def dense(self) -> bool:
        """Queries are embedded and fused: an embedder, and an index with vectors of its model."""
        return (self.embedder is not None and self.index is not None and self.index.vectors is not None
                and self.index.embeddings_model == self.embedder.model)

    async def retrieve_fused(self, question: str, *, previous_user_turns: Sequence[str] = (),
                             k: int = 5) -> Retrieval:
        """`retrieve`, with the passages in the order fused with dense retrieval of the (follow-up resolved)
        query; whether to answer stays `retrieve`'s decision."""
        return await self.fused(self.retrieve(question, previous_user_turns=previous_user_turns, k=k), k)

    async def fused(self, retrieval: Retrieval, k: int = 5) -> Retrieval:
        """`retrieval` (from `retrieve`) with its passages in the order fused with dense retrieval of its query."""
        return fuse(retrieval, await self._dense(retrieval.query, k), k)

    async def search_fused(self, query: str, k: int = 5) -> list[Hit]:
        """`search` fused with dense retrieval."""
        hits = self.search(query, k)
        dense = await self._dense(query, k)
        return list(fuse(Retrieval(hits=tuple(hits), answerable=False, query=query), dense, k).hits)

    async def _dense(self, query: str, k: int) -> list[Hit]:
        if not self.dense or self.embedder is None or self.index is None or not query.strip():
            return []
        vector = await self.embedder.vector(query)
        if vector is None:
            return []
        live = self._live()
        hidden = len(self.index) - len(live)
        try:
            hits = self.index.dense_search(vector, k + hidden)
        except ValueError as error:  # the model changed its dimensions under the same name: BM25 until a rebuild
            log.warning("dense retrieval of tenant %s skipped: %s", self.tenant, error)
            return []
        return [hit for hit in hits if hit.chunk.document_id not in self.removed][:k]

    def _live(self) -> KnowledgeIndex:
        assert self.index is not None
        if not self.removed:
            return self.index
        # Same interface, fewer documents: what retrieve() reads goes through the view.
        return cast(KnowledgeIndex, LiveView(self.index, self.removed))


class LiveView:
    """An index without some of its documents (deleted since it was built): their hits never come out."""

    def __init__(self, index: KnowledgeIndex, removed: frozenset[str]) -> None:
        self._index = index
        self._removed = removed
        self._chunks = {cid: c for cid, c in index.chunks.items() if c.document_id not in removed}
        self._hidden = len(index.chunks) - len(self._chunks)

    def search(self, query: str | Sequence[str], k: int = 5) -> list[Hit]:
        # Asking for k plus every hidden chunk guarantees k visible ones when the index has them.
        hits = self._index.search(query, k + self._hidden)
        return [hit for hit in hits if hit.chunk.document_id not in self._removed][:k]

    @property
    def chunks(self) -> Mapping[str, Chunk]:
        return self._chunks

    def __len__(self) -> int:
        return len(self._chunks)

    def __getattr__(self, name: str) -> object:
        return getattr(self._index, name)  # analyzer, idf, nbytes: the statistics stay the built index's


@dataclass(slots=True)
class _State:
    state: IndexState
    revision: int


@dataclass(slots=True)
class _Loaded:
    name: str
    index: KnowledgeIndex
    nbytes: int


class KnowledgeLibrary:
    """Tenant indexes on demand: `snapshot(tenant)` for a turn, `search` for the API."""

    def __init__(self, store: KnowledgeStore, metrics: KnowledgeMetrics, *, max_bytes: int = 256 * 1024 * 1024,
                 max_states: int = MAX_TENANT_STATES,
                 rebuild: Callable[[str], Awaitable[None]] | None = None,
                 embedder: QueryVectors | None = None) -> None:
        """`rebuild(tenant)`: ask for a new build of an index this process cannot read (the job queue), or
        whose vectors are not of `embedder`'s model (KEFU_EMBEDDINGS_MODEL changed: it serves with BM25
        alone meanwhile)."""
        self._store = store
        self._embedder = embedder
        self._rebuild = rebuild
        self._rebuilds_asked: set[str] = set()
        """Index objects whose rebuild was asked for already (once each, however many turns fail on it)."""
        self._metrics = metrics
        self.max_bytes = max_bytes
        self._max_states = max_states
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._indexes: OrderedDict[str, _Loaded] = OrderedDict()
        """Tenant -> its newest loaded index, least recently used first."""
        self.bytes = 0
        self._loading: dict[str, asyncio.Task[_Loaded]] = {}
        """Index object name -> its load in flight (one fetch however many turns wait for it)."""
        self._watch_task: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._resubscribe = asyncio.Event()

    # ------------------------------------------------------------------ public

    async def snapshot(self, tenant: str) -> TenantKnowledge:
        """The tenant's knowledge now: its newest published index (loaded if needed) and version."""
        current = self._states.get(tenant)
        if current is None:
            state, revision = await self._store.state(tenant)
            current = self._remember(tenant, state, revision)
        else:
            self._states.move_to_end(tenant)
        state = current.state
        if not state.index:
            return TenantKnowledge(tenant, state.version, None, frozenset(state.removed), self._embedder)
        loaded = self._indexes.get(tenant)
        if loaded is None or loaded.name != state.index:
            try:
                loaded = await self._load(tenant, state.index)
            except _IndexGone:
                # Replaced (and deleted) by a newer index meanwhile: read the state again, once.
                fresh, revision = await self._store.state(tenant)
                self._remember(tenant, fresh, revision)
                if fresh.index == state.index or not fresh.index:
                    if fresh.index:
                        # Lost from the Object Store: a new upload (or any job of the tenant) rebuilds it.
                        log.warning("knowledge index of tenant %s is missing from the store", tenant)
                    return TenantKnowledge(tenant, fresh.version, None, frozenset(fresh.removed), self._embedder)
                state = fresh
                loaded = await self._load(tenant, state.index)
        else:
            self._indexes.move_to_end(tenant)
        return TenantKnowledge(tenant, state.version, loaded.index, frozenset(state.removed), self._embedder)

    async def search(self, tenant: str, query: str, k: int = 5) -> list[Hit]:
        return await (await self.snapshot(tenant)).search_fused(query, k)

    def published(self, tenant: str, state: IndexState, revision: int) -> None:
        """A state this process wrote (an index it built, a delete it did): used at once, before the watch."""
        self._remember(tenant, state, revision)

    async def start(self, nc: NatsClient) -> None:
        """Follow the tenants' index states from now on (updates only: nothing is replayed at start)."""
        self._subscription = await self._subscribe(nc)
        self._watch_task = asyncio.create_task(self._watch(nc), name="kb-library-watch")

    def reconnected(self) -> None:
        """After a NATS reconnect updates may have been missed: forget the states (read again on use)."""
        self._resubscribe.set()

    async def aclose(self) -> None:
        tasks = {task for task in (self._watch_task, *self._loading.values()) if task is not None}
        # Cancelled again until they end: nats-py awaits with asyncio.wait_for, which on Python 3.11 can
        # swallow a cancel that arrives with the reply (https://github.com/python/cpython/issues/86296).
        deadline = asyncio.get_running_loop().time() + CLOSE_TIMEOUT_S
        while tasks and asyncio.get_running_loop().time() < deadline:
            for task in tasks:
                task.cancel()
            _, tasks = await asyncio.wait(tasks, timeout=0.1)
        if self._subscription is not None:
            # The ordered consumer's heartbeat and flow-control tasks end with it, not with the watch task.
            with contextlib.suppress(NatsError, TimeoutError):
                await self._subscription.unsubscribe()
            self._subscription = None

    # ------------------------------------------------------------------ states

    def _remember(self, tenant: str, state: IndexState, revision: int) -> _State:
        """Keep the newer of what we hold and (state, revision): the watch and a read may cross."""
        held = self._states.get(tenant)
        if held is not None and held.revision >= revision:
            self._states.move_to_end(tenant)
            return held
        held = self._states[tenant] = _State(state, revision)
        self._states.move_to_end(tenant)
        while len(self._states) > self._max_states:
            self._states.popitem(last=False)
        if tenant in self._indexes and state.index and self._indexes[tenant].name != state.index:
            self._prefetch(tenant, state.index)  # a tenant in use: have its new index ready for its next turn
        return held

    async def _subscribe(self, nc: NatsClient) -> Subscription:
        js = nc.jetstream(timeout=10)

        async def on_update(message: Msg) -> None:
            tenant = message.subject.split(".")[-2]
            operation = message.headers.get("KV-Operation") if message.headers else None
            try:
                state = IndexState() if operation in DEL_OPERATIONS else IndexState.from_json(message.data)
            except (ValueError, TypeError, AttributeError):
                log.warning("ignoring a malformed knowledge state of tenant %s", tenant)
                return
            self._remember(tenant, state, message.metadata.sequence.stream)

        return await js.subscribe(WATCH_SUBJECT, cb=on_update, ordered_consumer=True,
                                  config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW))

    async def _watch(self, nc: NatsClient) -> None:
        while True:
            await self._resubscribe.wait()
            self._resubscribe.clear()
            self._states.clear()  # any of them may be stale now
            if self._subscription is not None:
                with contextlib.suppress(NatsError, TimeoutError):
                    await self._subscription.unsubscribe()
                self._subscription = None
            while True:
                try:
                    self._subscription = await self._subscribe(nc)
                    self._states.clear()  # and again: updates may have come between the clear and the subscribe
                    break
                except (NatsError, TimeoutError) as error:
                    log.warning("knowledge watch: %s; retrying", str(error) or type(error).__name__)
                    await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ indexes

    def _prefetch(self, tenant: str, name: str) -> None:
        if name in self._loading:
            return
        task = self._start_load(tenant, name)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failed prefetch is retried on use

    async def _load(self, tenant: str, name: str) -> _Loaded:
        task = self._loading.get(name) or self._start_load(tenant, name)
        # shield: one turn giving up (a cancelled stream) must not cancel the load the others wait for.
        return await asyncio.shield(task)

    def _start_load(self, tenant: str, name: str) -> asyncio.Task[_Loaded]:
        task = asyncio.create_task(self._fetch(tenant, name), name="kb-index-load")
        self._loading[name] = task
        task.add_done_callback(lambda _: self._loading.pop(name, None))
        return task

    async def _fetch(self, tenant: str, name: str) -> _Loaded:
        start = time.perf_counter()
        try:
            data = await self._read(name)
            if data is None:
                raise _IndexGone(name)
            index = await asyncio.to_thread(KnowledgeIndex.from_bytes, data)
        except _IndexGone:
            raise
        except IndexFormatError as error:
            # Another kefu version's format, or damaged: fail this turn (retryable) and have it rebuilt.
            self._metrics.loads.labels("error").inc()
            await self._ask_rebuild(tenant, name, f"it is unreadable: {error}")
            raise Unavailable("the knowledge base is being rebuilt; retry") from error
        except (NatsError, TimeoutError, OSError, ValueError, KeyError, json.JSONDecodeError) as error:
            self._metrics.loads.labels("error").inc()
            log.warning("knowledge index of tenant %s could not be loaded: %s", tenant,
                        str(error) or type(error).__name__)
            raise Unavailable("the knowledge base is not reachable now") from error
        self._metrics.loads.labels("ok").inc()
        self._metrics.load_seconds.observe(time.perf_counter() - start)
        if self._embedder is not None and index.embeddings_model != self._embedder.model:
            await self._ask_rebuild(tenant, name, f"its vectors are of {index.embeddings_model or 'no model'!r}, "
                                                  f"not KEFU_EMBEDDINGS_MODEL {self._embedder.model!r}")
        loaded = _Loaded(name, index, max(1, int(index.nbytes)))
        held = self._states.get(tenant)
        if held is None or held.state.index == name:  # not superseded while it loaded
            self._keep(tenant, loaded)
        return loaded

    async def _ask_rebuild(self, tenant: str, name: str, why: str) -> None:
        """Queue a rebuild of the tenant's index `name` (once per index, however many turns meet it)."""
        if name in self._rebuilds_asked:
            return
        log.warning("knowledge index of tenant %s: %s; asking for a rebuild", tenant, why)
        if self._rebuild is not None:
            self._rebuilds_asked.add(name)
            with contextlib.suppress(NatsError, TimeoutError):
                await self._rebuild(tenant)

    async def _read(self, name: str, attempts: int = 3) -> bytes | None:
        # A nats-server that just restarted answers KV reads before it can create the consumer an
        # object read needs: retry briefly before failing the turn.
        for attempt in range(1, attempts + 1):
            try:
                return await self._store.read_index(name)
            except (NatsError, TimeoutError):
                if attempt == attempts:
                    raise
                await asyncio.sleep(0.25 * attempt)
        return None

    def _keep(self, tenant: str, loaded: _Loaded) -> None:
        old = self._indexes.pop(tenant, None)
        if old is not None:
            self.bytes -= old.nbytes
        self._indexes[tenant] = loaded
        self.bytes += loaded.nbytes
        # The newest entry always stays, even alone over the budget: else every turn would load it again.
        while self.bytes > self.max_bytes and len(self._indexes) > 1:
            _, evicted = self._indexes.popitem(last=False)
            self.bytes -= evicted.nbytes
            self._metrics.evictions.inc()
        self._metrics.cache_bytes.set(self.bytes)
        self._metrics.cache_indexes.set(len(self._indexes))


class _IndexGone(Exception):
    """The index object named by a state no longer exists (a newer build replaced it)."""
