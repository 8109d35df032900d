"""The conversation index: who is in which status, per tenant, for agents' lists and the timers.

KV bucket `kefu_conversations` (a projection of the sessions' metadata, which stays the truth):
- `<tenant>.<status>.<session_id>`: a ConversationSummary; moved on every status change, so
  a list of one status reads `<tenant>.<status>.*` and nothing else.
- `<tenant>.visitor.<sha256(owner)[:32]>.<session_id>`: one per session of a visitor, for
  the visitor's own list (the summaries then come from the metadata itself).
- `<tenant>.joined.waiting_human.<session_id>`: a QueueMarker, written once when the conversation
  joins the queue and purged when it leaves; nothing a preview changes is in it, so the stream
  holds these in join order and the queue is read from its start (queue_page.py).

Old entries are purged, not deleted, so no tombstones pile up in listings. Two projections
of one conversation may interleave; each re-reads the metadata after writing and projects
again when the version moved, so the last one to finish writes the newest state. A process
that dies between the metadata write and the projection leaves the index behind until the
conversation's next change or idle timer writes it again (a missing queue marker: the next start,
mark_waiting).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Self

from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError
from nats.js.kv import KeyValue

from services.common.direct_get import direct_get
from services.common.nats_client import ensure_key_value
from services.session.models import ConversationState, SessionMeta
from services.session.reads import MULTI_LAST_LIMIT, count_subjects, is_value, last_per_subject
from services.session.together import together

log = logging.getLogger(__name__)

INDEX_BUCKET = "kefu_conversations"
INDEX_STREAM = f"KV_{INDEX_BUCKET}"
INDEX_SUBJECT_PREFIX = f"$KV.{INDEX_BUCKET}"
VISITOR_TOKEN = "visitor"
JOINED_TOKEN = "joined"
QUEUE_STATUS = "waiting_human"
API_TIMEOUT_S = 5.0
"""As nats-py's JetStream API calls."""
FIRST_WINDOW_PER_ENTRY = 16
"""The first window of a newest-first page: this many stream messages per entry asked for (the other
statuses, tenants and the visitors' entries share the stream); then four times more each round."""
WINDOW_BATCH = 1024
"""Entries one direct-get reply carries before the next is asked for."""
PROJECTION_ROUNDS = 5
"""A projection chasing a conversation that keeps changing stops after this many rounds (its next change goes on)."""


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    tenant: str
    session_id: str
    owner: str
    state: ConversationState
    created_at: float
    updated_at: float
    """Time of the newest stored event when the entry was written: it lags for "ai" conversations."""
    preview: str = ""

    @classmethod
    def of(cls, session_id: str, meta: SessionMeta) -> Self:
        return cls(meta.tenant, session_id, meta.owner, meta.state, meta.created_at, meta.updated_at, meta.preview)

    def to_json(self) -> bytes:
        return json.dumps({"owner": self.owner, "state": self.state.to_dict(), "created_at": self.created_at,
                           "updated_at": self.updated_at, "preview": self.preview}, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, tenant: str, session_id: str, data: bytes) -> Self:
        raw = json.loads(data)
        return cls(tenant, session_id, str(raw["owner"]), ConversationState.from_dict(raw["state"]),
                   float(raw["created_at"]), float(raw["updated_at"]), str(raw.get("preview", "")))


def _tenant_and_id(subject: str) -> tuple[str, str]:
    tenant, _, session_id = subject.removeprefix(INDEX_SUBJECT_PREFIX + ".").split(".")
    return tenant, session_id


def summary_of(headers: Mapping[str, str], data: bytes) -> ConversationSummary:
    """An entry of a status, from a direct get's reply (its subject in the `Nats-Subject` header)."""
    tenant, session_id = _tenant_and_id(headers["Nats-Subject"])
    return ConversationSummary.from_json(tenant, session_id, data)


@dataclass(frozen=True, slots=True)
class QueueMarker:
    """When a conversation joined the queue (`state.since`) and the state version that put it there."""

    since: float
    version: int

    @classmethod
    def of(cls, state: ConversationState) -> Self:
        return cls(state.since, state.version)

    def to_json(self) -> bytes:
        return json.dumps({"since": self.since, "version": self.version}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        raw = json.loads(data)
        return cls(float(raw["since"]), int(raw["version"]))


def index_entries(tenant: str, session_id: str, meta: SessionMeta) -> list[tuple[str, bytes]]:
    """The keys and values indexing a new conversation (add_new; a bulk seed writes the same)."""
    entries = [(status_key(tenant, meta.state.status, session_id), ConversationSummary.of(session_id, meta).to_json()),
               (visitor_key(tenant, meta.owner, session_id), b"1")]
    if meta.state.status == QUEUE_STATUS:
        entries.append((joined_key(tenant, session_id), QueueMarker.of(meta.state).to_json()))
    return entries


MetaReader = Callable[[], Awaitable[SessionMeta | None]]
"""Reads a conversation's metadata again (None: it is gone)."""


class ConversationIndex:
    def __init__(self, nc: NatsClient, kv: KeyValue, *, batch_reads: bool) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._kv = kv
        self._batch_reads = batch_reads

    @property
    def nc(self) -> NatsClient:
        return self._nc

    @property
    def batch_reads(self) -> bool:
        """The server answers batched direct gets (2.11+)."""
        return self._batch_reads

    @classmethod
    async def open(cls, nc: NatsClient, *, ttl_s: float, replicas: int = 1) -> ConversationIndex:
        """Entries age out with the sessions: each is written on every status change, and the idle
        timer writes an open conversation's again while it stays active (timers.py)."""
        kv = await ensure_key_value(nc.jetstream(), KeyValueConfig(
            bucket=INDEX_BUCKET, history=1, ttl=ttl_s, storage=StorageType.FILE, replicas=replicas, direct=True),
            reconcile=True)
        version = nc.connected_server_version
        index = cls(nc, kv, batch_reads=(version.major, version.minor) >= (2, 11))
        marked = await index.mark_waiting()
        if marked:
            log.info("queue markers written for %d waiting conversations", marked)
        return index

    async def add_new(self, tenant: str, session_id: str, meta: SessionMeta) -> None:
        """Index a session about to be created. Written before its metadata exists, so no
        change of it can race this write; a dangling entry (the create failed and its clean-up
        too) is skipped by readers. All entries at once: they are independent keys."""
        first, *others = (self._kv.put(key, value) for key, value in index_entries(tenant, session_id, meta))
        await together(first, *others)

    async def project(self, tenant: str, session_id: str, meta: SessionMeta, reread: MetaReader, *,
                      moved: bool = True) -> None:
        """Write the entry of `meta` (the metadata just written) until it matches the metadata read back.

        `moved` False: the state did not change (a new preview), so the other statuses' entries
        need no purge and the queue marker stays where it is (a preview must not move a conversation
        in the queue) unless the state turns out to have changed meanwhile.
        """
        for _ in range(PROJECTION_ROUNDS):
            if moved:
                await together(self._move(tenant, session_id, meta), self._mark(tenant, session_id, meta.state))
            else:
                await self._kv.put(status_key(tenant, meta.state.status, session_id),
                                   ConversationSummary.of(session_id, meta).to_json())
            current = await reread()
            if current is None:
                await self.remove(tenant, session_id, meta.owner)
                return
            if current.state == meta.state and current.preview == meta.preview:
                return
            moved = moved or current.state != meta.state
            meta = current

    async def _move(self, tenant: str, session_id: str, meta: SessionMeta) -> None:
        await self._kv.put(status_key(tenant, meta.state.status, session_id),
                           ConversationSummary.of(session_id, meta).to_json())
        # Keep only the newest entry of this conversation across statuses: ours, unless
        # a concurrent projection wrote after us (then its re-read fixes what it wrote).
        await self._js.purge_stream(INDEX_STREAM, subject=f"{INDEX_SUBJECT_PREFIX}.{tenant}.*.{session_id}", keep=1)

    async def _mark(self, tenant: str, session_id: str, state: ConversationState) -> None:
        """Queue marker of a state just written: a new one at the stream's end when it (re)joined the queue,
        none when it left. A stale projection's marker is fixed by its re-read, as the status entries are."""
        if state.status == QUEUE_STATUS:
            await self._kv.put(joined_key(tenant, session_id), QueueMarker.of(state).to_json())
        else:
            await self._js.purge_stream(INDEX_STREAM,
                                        subject=f"{INDEX_SUBJECT_PREFIX}.{joined_key(tenant, session_id)}")

    async def mark_waiting(self) -> int:
        """Give every waiting conversation without a queue marker one, in join order; how many got one.

        At start: conversations stored before markers existed, or whose projection stopped between
        the entry and its marker. Reads the waiting entries and markers of every tenant, so it costs
        what waits, never what is stored. Each marker is created only where none is (a projection
        meanwhile wrote a newer one); pipelined on one connection, so they land in the order sent.
        A server before 2.11 serves the queue from every waiting entry (queue_page.py): nothing to do.
        """
        if not self._batch_reads:
            return 0
        waiting, markers = await asyncio.gather(
            self._subject_names(f"{INDEX_SUBJECT_PREFIX}.*.{QUEUE_STATUS}.*"),
            self._subject_names(f"{INDEX_SUBJECT_PREFIX}.{joined_key('*', '*')}"))
        marked = {subject.removeprefix(INDEX_SUBJECT_PREFIX + ".") for subject in markers}
        names = [subject for subject in waiting if joined_key(*_tenant_and_id(subject)) not in marked]
        chunks = [names[n:n + MULTI_LAST_LIMIT] for n in range(0, len(names), MULTI_LAST_LIMIT)]
        replies = await asyncio.gather(*(direct_get(self._nc, INDEX_STREAM, {"multi_last": chunk,
                                                                             "batch": len(chunk)})
                                         for chunk in chunks))
        unmarked = [summary_of(m.headers or {}, m.data) for reply in replies for m in reply
                    if is_value(m.headers, m.data)]
        unmarked.sort(key=lambda s: (s.state.since, s.session_id))
        acks = [await self._js.publish_async(f"{INDEX_SUBJECT_PREFIX}.{joined_key(s.tenant, s.session_id)}",
                                             QueueMarker.of(s.state).to_json(),
                                             headers={"Nats-Expected-Last-Subject-Sequence": "0"})
                for s in unmarked]
        outcomes = await asyncio.gather(*acks, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, APIError)]
        if failed:  # best effort: such a conversation shows in the queue again on its next change
            log.warning("%d queue markers not written: %s", len(failed), str(failed[0]) or type(failed[0]).__name__)
        return sum(not isinstance(outcome, BaseException) for outcome in outcomes)

    async def remove(self, tenant: str, session_id: str, owner: str) -> None:
        visitor = visitor_key(tenant, owner, session_id)
        await together(self._js.purge_stream(INDEX_STREAM, subject=f"{INDEX_SUBJECT_PREFIX}.{tenant}.*.{session_id}"),
                       self._js.purge_stream(INDEX_STREAM, subject=f"{INDEX_SUBJECT_PREFIX}.{visitor}"),
                       self._js.purge_stream(INDEX_STREAM,
                                             subject=f"{INDEX_SUBJECT_PREFIX}.{joined_key(tenant, session_id)}"))

    async def in_status(self, tenant: str, status: str) -> list[ConversationSummary]:
        """Entries of one status of one tenant (agents' lists)."""
        found = await last_per_subject(self._nc, INDEX_STREAM, f"{INDEX_SUBJECT_PREFIX}.{tenant}.{status}.*",
                                       batch_reads=self._batch_reads)
        return [summary_of({"Nats-Subject": subject}, data) for subject, data in found]

    async def newest_in_status(self, tenant: str, status: str, limit: int,
                               accept: Callable[[ConversationSummary], bool] | None = None,
                               ) -> list[ConversationSummary]:
        """At least the `limit` newest entries of one status that `accept` (all of them when there are fewer).

        An entry is rewritten whenever its summary changes and the bucket keeps one message a key, so the
        newest entries are the last ones in the stream: they are read back from its end in windows growing
        fourfold, each one batched direct get of the matching entries from the window's start on. A page
        costs what it shows (and the entries written since its window began), not what the tenant stored.
        """
        if not self._batch_reads:
            return [s for s in await self.in_status(tenant, status) if accept is None or accept(s)]
        filter_subject = f"{INDEX_SUBJECT_PREFIX}.{tenant}.{status}.*"
        state = (await self._js.stream_info(INDEX_STREAM)).state
        window = max(1, limit) * FIRST_WINDOW_PER_ENTRY
        while True:
            start = max(state.first_seq, state.last_seq - window + 1)
            found = await direct_get(self._nc, INDEX_STREAM,
                                     {"seq": start, "next_by_subj": filter_subject, "batch": WINDOW_BATCH})
            summaries = [summary_of(message.headers or {}, message.data) for message in found
                         if is_value(message.headers, message.data)]
            accepted = [s for s in summaries if accept is None or accept(s)]
            if len(accepted) >= limit or start <= state.first_seq:
                return accepted
            window *= 4

    async def sessions_of_visitor(self, tenant: str, owner: str) -> list[str]:
        """The visitor's sessions, from the names of their entries' subjects: one reply, however many there are.

        Every new conversation of a widget visitor asks (the open-conversation limit): reading the
        entries themselves cost a message each, about 40 µs of this process's CPU per conversation the
        visitor ever opened. An entry is there or purged (never a delete marker), so its subject says it.
        """
        subjects = await self._subject_names(f"{INDEX_SUBJECT_PREFIX}.{visitor_key(tenant, owner, '*')}")
        return [subject.rsplit(".", 1)[1] for subject in subjects]

    async def _subject_names(self, filter_subject: str) -> list[str]:
        """Subjects of the index holding a message and matching `filter_subject`, named by the server if it can."""
        subjects = await self._subjects(filter_subject)
        if subjects is None:  # more than the server names in one reply: read them
            found = await last_per_subject(self._nc, INDEX_STREAM, filter_subject, batch_reads=self._batch_reads)
            subjects = [subject for subject, _ in found]
        return subjects

    async def _subjects(self, filter_subject: str) -> list[str] | None:
        """Subjects of the index holding a message and matching `filter_subject`; None when the server pages them."""
        reply = await self._nc.request(f"$JS.API.STREAM.INFO.{INDEX_STREAM}",
                                       json.dumps({"subjects_filter": filter_subject}).encode(), timeout=API_TIMEOUT_S)
        info = json.loads(reply.data)
        if "error" in info:
            APIError.from_error(info["error"])  # raises the matching nats.js error
        subjects = info.get("state", {}).get("subjects") or {}
        if int(info.get("total", len(subjects))) > len(subjects):
            return None
        return list(subjects)

    async def count(self, status: str) -> int:
        """Conversations in `status` over every tenant, counted by the server without reading them."""
        return await count_subjects(self._nc, INDEX_STREAM, f"{INDEX_SUBJECT_PREFIX}.*.{status}.*")


def status_key(tenant: str, status: str, session_id: str) -> str:
    return f"{tenant}.{status}.{session_id}"


def joined_key(tenant: str, session_id: str) -> str:
    # Four tokens, as a visitor's: the `<tenant>.*.<session_id>` purges and filters of status entries miss it.
    return f"{tenant}.{JOINED_TOKEN}.{QUEUE_STATUS}.{session_id}"


def visitor_key(tenant: str, owner: str, session_id: str) -> str:
    # Hashed: a `sub` may hold characters a subject token may not (dots, spaces, wildcards).
    return f"{tenant}.{VISITOR_TOKEN}.{hashlib.sha256(owner.encode()).hexdigest()[:32]}.{session_id}"
