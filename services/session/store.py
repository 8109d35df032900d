"""Sessions in NATS JetStream: metadata in a KV bucket, messages in a stream per session subject.

- KV `kefu_sessions`, key `<tenant>.<session_id>`: owner, state and counters, written by
  compare-and-set; the bucket's max age is the idle TTL, and the counters' writes refresh the
  key, so a session expires when nobody wrote to it for that long. The bucket asks the
  server (2.11+) for a `Nats-Marker-Reason: MaxAge` marker when a key ages out, which is
  how expiries are counted (`watch_expired`).
- Stream `KEFU_MESSAGES`, subject `kefu.msg.<tenant>.<session_id>`: one message each.
  JetStream assigns the sequence, so concurrent appends are never lost nor reordered;
  `max_msgs_per_subject` bounds the history (oldest dropped first); `Nats-Msg-Id`
  makes a retried append with the same message id a no-op.
- Counters are written behind (pending.py, issue 20 item 5): an ordinary message costs one
  JetStream write, its publish; its counters, preview, answer lease and the TTL refresh reach
  the key in one CAS at most once a second per conversation. This process's reads add what is
  pending; a state change or a claim takes it into its own write. A new conversation's metadata
  is created with its first message counted.
- A new conversation costs four round trips, not one per step (issue 20): its refusals at once
  (visitor rate, open conversations, tenant quota), then its first message beside its index
  entries, then its metadata, then its timer. A step that fails, or a call cancelled midway,
  takes back what the others stored (`_discard`), so nobody finds half a conversation.
- An append checks access against this process's recent view of the metadata (meta_cache.py).
  A visitor's message and a conditional append (an AI answer) read the state again after the
  publish: whether the AI answers, or its answer stands, depends on the state as of the
  message's place in the log (a change this read misses stores its event after the message).
- Conversation state (status, version, assignee) lives in the same metadata record and
  changes by CAS too: a counter batch and a status change that race both re-read and
  re-apply, so neither overwrites the other. Each change then stores a `state` event in
  the log, which orders it among the messages (readers void AI replies generated under an
  older version by it), moves the conversation's entry in the index (index.py) and arms the
  timers its new state needs (schedule.py); `purge` erases a conversation past its retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar, overload

from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    PubAck,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    KeyNotFoundError,
    KeyValueLimitMarkerTTLNotSupportedError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from services.common.conversation_log import LOG_STREAM, LOG_SUBJECT_PREFIX, log_subject
from services.common.direct_get import direct_get
from services.common.errors import InvalidArgument, KefuError, NotFound, PermissionDenied, Unavailable
from services.common.nats_client import ensure_key_value, ensure_stream, fetch_batch
from services.session.conversation import MAX_NAME_CHARS, Change, decide, describe
from services.session.errors import Conflict, QuotaExceeded, StorageFull, WrongStatus
from services.session.index import ConversationIndex
from services.session.limits import TenantUsage
from services.session.meta_cache import MetaCache
from services.session.models import (
    MAX_CITATIONS,
    MESSAGE_ID_PATTERN,
    ROLES,
    SESSION_ID_PATTERN,
    AnswerOwed,
    Citation,
    ConversationState,
    MetaDelta,
    Principal,
    SessionMeta,
    StoredMessage,
    new_id,
)
from services.session.pending import FLUSH_S, Pending, PendingCounters
from services.session.schedule import TimerSchedule
from services.session.together import together
from services.session.tokens import TokenCounter
from services.session.visibility import visible

log = logging.getLogger(__name__)
T = TypeVar("T")
Admit = Callable[[], Coroutine[object, object, None]]
"""A caller's own check before an append stores anything (the visitor's rate): raises to refuse."""

META_BUCKET = "kefu_sessions"
META_STREAM = f"KV_{META_BUCKET}"
META_SUBJECT_PREFIX = f"$KV.{META_BUCKET}"
EXPIRY_CONSUMER = "kefu_session_expiry"
"""Durable consumer of the metadata bucket shared by every replica: each marker is counted once."""
CAS_ATTEMPTS = 20
EXPIRY_BATCH = 512
EXPIRY_PAUSE_S = 2.0
"""How long the expiry watch lets metadata updates gather once it has read them all."""
EXPIRY_MARKER_TTL_S = 3600.0
"""How long an expiry marker stays; a replica down for less than this still counts it later."""
MAX_DUPLICATE_WINDOW_S = 120.0
APPEND_KINDS = frozenset({"message", "note"})
STREAM_FULL = 10077
"""JetStream's err_code for a publish refused by a stream's limits under DiscardPolicy.NEW."""
WRONG_LAST_SEQUENCE = 10071
"""JetStream's err_code for a publish whose Nats-Expected-Last-Subject-Sequence is no longer the last."""
MAX_ANSWER_LEASE_S = 300.0
CONVERSATION_BYTES = 2048
"""What a new conversation adds to its tenant's usage besides its messages: its metadata and index
entries in KV (about 1.2 KB), so a quota also bounds how many conversations a tenant's visitors open."""
MESSAGE_OVERHEAD_BYTES = 96
"""What JetStream stores besides subject and payload (the Nats-Msg-Id header, its record header)."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    session_id: str
    message: StoredMessage
    created: bool
    duplicate: bool = False
    state: ConversationState = field(default_factory=ConversationState)
    """The conversation's state after the append."""
    reopened: TransitionResult | None = None
    """The reopen a visitor's message to a closed conversation caused."""
    user_message_count: int = 0
    """Visitor messages in the conversation, this one included (as far as this process knows)."""
    history: tuple[StoredMessage, ...] | None = None
    """Asked for (`with_history`): the conversation's kept events after the append, this message the
    newest; a new conversation's is this message alone, read from nowhere. None for a duplicate, and
    (unless read anyway) when the state after the append is not "ai": nobody asks the model then."""


@dataclass(frozen=True, slots=True)
class AnswerClaim:
    granted: bool
    message_id: str
    """The owed visitor message ("" when the AI owes nothing)."""
    held_for_s: float
    """Not granted: how long another edge still holds it."""
    state: ConversationState


@dataclass(frozen=True, slots=True)
class TransitionResult:
    state: ConversationState
    """The state after the change (the current one when nothing changed)."""
    previous: ConversationState
    event: StoredMessage | None
    """The stored `state` event; None when nothing changed."""
    meta: SessionMeta
    revision: int

    @property
    def unchanged(self) -> bool:
        return self.event is None


class SessionStore:
    """Every operation is scoped to the principal: another owner's session is NotFound."""

    def __init__(self, nc: NatsClient, meta: KeyValue, index: ConversationIndex, counter: TokenCounter, *,
                 max_history: int, max_message_chars: int, max_visitor_conversations: int = 0,
                 usage: TenantUsage | None = None, answer_lease_s: float = 0.0,
                 schedule: TimerSchedule | None = None, meta_flush_s: float = FLUSH_S) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._meta = meta
        self.index = index
        self._counter = counter
        self._max_history = max_history
        self._max_message_chars = max_message_chars
        self._max_visitor_conversations = max_visitor_conversations
        """Open conversations a visitor may have (0: no limit)."""
        self.usage = usage
        """Stored bytes per tenant against its quota (None: no quota)."""
        self._answer_lease_s = answer_lease_s
        """How long the edge that stored a visitor message has to answer it before another may (0: untracked)."""
        self.schedule = schedule
        """Arms each conversation's timers on create and status change (None: no timers, as in store tests)."""
        self._cache = MetaCache()
        self._pending = PendingCounters(self._flush, meta_flush_s)
        self._writing: dict[str, tuple[MetaDelta, int]] = {}
        """Per key: the counters a flush is writing and the revision it writes over (reads in between add them)."""
        self.expiry_markers = True
        """False on a server older than 2.11: expiries happen but cannot be counted."""
        version = nc.connected_server_version
        self.batch_reads = (version.major, version.minor) >= (2, 11)
        """Read a history with one batched direct get (server 2.11+), else with a short-lived consumer."""

    @classmethod
    async def open(cls, nc: NatsClient, counter: TokenCounter, *, max_history: int,
                   max_message_chars: int, ttl_s: float, replicas: int = 1, max_bytes: int = -1,
                   max_visitor_conversations: int = 0, usage: TenantUsage | None = None,
                   answer_lease_s: float = 0.0, schedule: TimerSchedule | None = None) -> SessionStore:
        """Create or reconcile the bucket and stream. `ttl_s` may be short here (tests);
        SessionSettings holds production to at least 60 s."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        js = nc.jetstream()
        config = KeyValueConfig(bucket=META_BUCKET, history=1, ttl=ttl_s, storage=StorageType.FILE,
                                limit_marker_ttl=EXPIRY_MARKER_TTL_S, replicas=replicas,
                                direct=meta_reads_direct(replicas))
        markers = True
        try:
            meta = await ensure_key_value(js, config, reconcile=True)
        except KeyValueLimitMarkerTTLNotSupportedError:
            log.warning("nats-server older than 2.11: expired sessions are not counted")
            markers = False
            config.limit_marker_ttl = None
            meta = await ensure_key_value(js, config, reconcile=True)
        if await _reconcile_meta_stream(nc, ttl_s, EXPIRY_MARKER_TTL_S if markers else None, replicas):
            meta = await js.key_value(META_BUCKET)  # a handle reads directly only if the stream allowed it when opened
        await ensure_stream(js, StreamConfig(
            name=LOG_STREAM, subjects=[f"{LOG_SUBJECT_PREFIX}.>"], storage=StorageType.FILE,
            num_replicas=replicas,
            max_msgs_per_subject=max_history, max_age=ttl_s * 2, allow_direct=True,
            # Full: refuse new messages (StorageFull) rather than silently drop other tenants' oldest ones.
            # The per-subject history bound still drops a conversation's oldest under DiscardPolicy.NEW.
            max_bytes=max_bytes, discard=DiscardPolicy.NEW if max_bytes > 0 else DiscardPolicy.OLD,
            # The server refuses a duplicate window longer than the max age.
            duplicate_window=min(MAX_DUPLICATE_WINDOW_S, ttl_s * 2)))
        index = await ConversationIndex.open(nc, ttl_s=ttl_s, replicas=replicas)
        store = cls(nc, meta, index, counter, max_history=max_history, max_message_chars=max_message_chars,
                    max_visitor_conversations=max_visitor_conversations, usage=usage,
                    answer_lease_s=answer_lease_s, schedule=schedule,
                    # Written well within the TTL, which the writes refresh (tests run TTLs of a second).
                    meta_flush_s=min(FLUSH_S, ttl_s / 4))
        store.expiry_markers = markers
        return store

    async def append(self, principal: Principal, session_id: str, role: str, content: str,
                     message_id: str = "", *, kind: str = "", sender_name: str = "",
                     if_version: int = 0, after_seq: int = 0, citations: Sequence[Citation] = (),
                     with_history: bool = False, admit: Admit | None = None) -> AppendResult:
        """Store one message. `if_version` non-zero: only while the state version is still that one
        (Conflict otherwise, and nothing stays stored: a change that lands while publishing is
        caught by the check after it, which deletes the message again). `after_seq` with it, for a reply:
        the newest event the caller knew of; while the log still ends there, the reply is stored in one
        conditional write, without that check (a state change stores its event in the log, so none came).
        `with_history`: also return the kept events (a turn's context, read beside the state check).
        `admit`: the caller's own refusal (the visitor's rate), taken first, before anything is stored."""
        kind = kind or "message"
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {sorted(ROLES)}")
        if kind not in APPEND_KINDS:
            raise InvalidArgument(f"kind must be one of {sorted(APPEND_KINDS)}")
        if kind == "note":
            if not principal.is_staff:
                raise PermissionDenied("only staff may write notes")
            if role != "agent":
                raise InvalidArgument("a note's role must be agent")
        if not content:
            raise InvalidArgument("content must not be empty")
        if len(content) > self._max_message_chars:
            raise InvalidArgument(f"content is longer than {self._max_message_chars} characters")
        if len(sender_name) > MAX_NAME_CHARS:
            raise InvalidArgument(f"sender_name must be at most {MAX_NAME_CHARS} characters")
        if message_id and not MESSAGE_ID_PATTERN.fullmatch(message_id):
            raise InvalidArgument("message_id must be 32 lowercase hex characters")
        if if_version < 0:
            raise InvalidArgument("if_version must not be negative")
        if citations and role != "assistant":
            raise InvalidArgument("only an assistant message cites sources")
        if len(citations) > MAX_CITATIONS:
            raise InvalidArgument(f"at most {MAX_CITATIONS} citations")
        created = not session_id
        if created and if_version > 1:
            raise Conflict("version_conflict", 1)  # a new conversation starts at version 1
        # The checks are independent reads, all before anything is stored (issue 20): what this process can
        # answer from its own view first (the visitor's rate is taken from it: limits.py), then the rest at
        # once, in one round trip.
        if admit is not None:
            await admit()
        entry = None if created else self._cached_entry(principal, session_id)
        size = self._stored_size(principal.tenant, content) + (CONVERSATION_BYTES if created else 0)
        usage_known = self.usage is None or self.usage.check_known(principal.tenant, size)
        checks: list[Coroutine[object, object, None]] = []
        if created and principal.role == "visitor" and not principal.subject.startswith("api:"):
            # Widget visitors only: `api` integrators (subjects `api:<sub>`) open one per end user.
            checks.append(self._check_open_conversations(principal))
        if not usage_known and self.usage is not None:
            checks.append(self.usage.check(principal.tenant, size))
        key = meta_key(principal.tenant, session_id)
        if entry is None and not created:
            entry = await together(self._authorize_entry(principal, session_id), *checks)  # its read beside them
        elif checks:
            await together(checks[0], *checks[1:])
        if created:
            if self.usage is not None:
                self.usage.add(principal.tenant, CONVERSATION_BYTES)
            session_id = new_id()
            key = meta_key(principal.tenant, session_id)
            now = time.time()
            meta = SessionMeta(principal.tenant, principal.subject, now, now, state=ConversationState(since=now))
            revision = 0  # created below, with the first message counted
        else:
            assert entry is not None
            meta, revision = entry
            if meta.owner != principal.subject and role != "agent":
                # Staff may read a visitor's conversation and answer in it as an agent, but
                # never speak as the visitor or the AI: that is the owner's (and the edge's).
                raise NotFound("no such session")
        if if_version and meta.state.version != if_version:
            raise Conflict("version_conflict", meta.state.version)
        visitor_message = role == "user" and kind == "message"
        reopened: TransitionResult | None = None
        if visitor_message and meta.state.status == "closed":
            try:
                reopened = await self._apply(principal.tenant, session_id, None, Change("reopen_by_visitor"),
                                             (meta, revision))
                meta, revision = reopened.meta, reopened.revision
            except WrongStatus:
                # Another message of the visitor reopened it first: go on in the state it left.
                entry = await self.read_entry(principal.tenant, session_id)
                if entry is None:
                    raise NotFound("no such session") from None
                meta, revision = entry
        message = StoredMessage(id=message_id or new_id(), role=role, content=content,
                                created_at=time.time(), tokens=self._counter.count(content),
                                encoding=self._counter.name, kind=kind,
                                sender_id=principal.subject if role in ("user", "agent") else "",
                                sender_name=sender_name, version=if_version, citations=tuple(citations))
        if created:
            return await self._begin(principal, session_id, meta, message, with_history)
        ack = None
        if if_version and after_seq > 0 and not visitor_message:
            ack = await self._publish(principal.tenant, session_id, message, after_seq=after_seq)
        checked = ack is not None  # stored right after `after_seq`: no state change came between
        if ack is None:
            ack = await self._publish(principal.tenant, session_id, message)
        if ack.duplicate:
            first = await self._first_copy(principal, session_id, created, ack.seq)
            return replace(first, state=meta.state, reopened=reopened)
        stored = replace(message, seq=ack.seq)
        history: Sequence[StoredMessage] | None = None
        state = meta.state
        if visitor_message or (if_version and not checked):
            # Whether the AI answers (or its answer stands) depends on the state as of now, after the
            # message is in the log: a change not seen here stores its event after this message, where
            # the edge's watch of the log sees it. So read it, rather than trust this process's view.
            if with_history and meta.state.status == "ai":
                # The AI is likely to answer: read its context beside the state.
                entry, history = await asyncio.gather(self._read_entry(key),
                                                      self._read_history(log_subject(principal.tenant, session_id)))
            else:
                entry = await self._read_entry(key)
            if entry is None:
                # Deleted or expired meanwhile (by another replica, or while this one's view was cached):
                # the message must not outlive its session.
                await self._delete_messages([stored.seq])
                raise NotFound("no such session")
            meta, revision = entry
            state = meta.state
            if if_version and state.version != if_version:
                # A change landed between the check and the publish: take the message back.
                await self._delete_messages([stored.seq])
                raise Conflict("version_conflict", state.version)
            if visitor_message and state.status == "closed" and reopened is None:
                # Another replica closed it after this one's view of it: reopen it now, as before the append.
                with contextlib.suppress(WrongStatus):
                    reopened = await self._apply(principal.tenant, session_id, None, Change("reopen_by_visitor"),
                                                 None)
                    state = reopened.state
        if with_history and history is None and state.status == "ai":
            history = await self._read_history(log_subject(principal.tenant, session_id))
        # Counters, preview, lease and the TTL refresh follow within a second, in one write for every
        # message of that second (pending.py); the queue's preview of a waiting conversation with them.
        self._pending.add(key, stored)
        return AppendResult(session_id, stored, created, state=state, reopened=reopened,
                            user_message_count=self._view(key, meta, revision).user_message_count,
                            history=tuple(history) if history is not None else None)

    async def _begin(self, principal: Principal, session_id: str, meta: SessionMeta, message: StoredMessage,
                     with_history: bool) -> AppendResult:
        """A new conversation: its index entries and its first message at once, then its metadata.

        The index entries only have to exist before the metadata (index.add_new), and the message
        before it too (the metadata counts it): so two steps, not three. A failed or cancelled step
        takes back what the other stored: nobody knows the session yet.
        """
        tenant = principal.tenant
        publishing = asyncio.create_task(self._publish(tenant, session_id, message))
        indexing = asyncio.create_task(self.index.add_new(tenant, session_id, meta))
        try:
            # Both end before this goes on, even when cancelled (gather cancels them and waits for them),
            # and a failure of one does not cut the other short: what it stored is known, and taken back.
            await asyncio.gather(publishing, indexing, return_exceptions=True)
            error = _failure(publishing) or _failure(indexing)  # a refusal (StorageFull) first
            if error is not None:
                raise error
        except BaseException:
            await self._discard(tenant, session_id, meta.owner, created=False)
            raise
        ack = publishing.result()
        if ack.duplicate:
            first = await self._first_copy(principal, session_id, True, ack.seq)
            return replace(first, state=meta.state)
        return await self._create(tenant, session_id, meta, replace(message, seq=ack.seq), with_history)

    async def _create(self, tenant: str, session_id: str, meta: SessionMeta, first: StoredMessage,
                      with_history: bool) -> AppendResult:
        """Create the metadata of a new conversation with its first message counted: one write."""
        delta = MetaDelta()
        delta.add(first)
        meta = meta.with_delta(delta, self._answer_lease_s)
        key = meta_key(tenant, session_id)
        try:
            # Armed beside the write, with the first message counted (the idle timer starts from it): a timer
            # whose conversation never got its metadata finds nothing when due, and does nothing.
            revision, _ = await asyncio.gather(self._meta.create(key, meta.to_json()),
                                               self._arm(tenant, session_id, meta))
        except BaseException:
            # Nobody knows the session yet: leave nothing of it behind (a create that timed out may have landed).
            await self._discard(tenant, session_id, meta.owner, created=True)
            raise
        self._cache.put(key, meta, revision)
        return AppendResult(session_id, first, True, state=meta.state, user_message_count=meta.user_message_count,
                            history=(first,) if with_history else None)

    async def _discard(self, tenant: str, session_id: str, owner: str, *, created: bool) -> None:
        """Take back a first message nobody was told about (it failed, or its call was cancelled).

        By subject, not by sequence: a new session's subjects hold nothing but its own, and a publish
        cancelled before its ack may have landed all the same. At once and best effort: what is left
        dangles (readers skip an index entry without metadata; the log's max age takes the rest).
        `created`: its metadata was written, or may have been.
        """
        steps = [self._js.purge_stream(LOG_STREAM, subject=log_subject(tenant, session_id)),
                 self.index.remove(tenant, session_id, owner)]
        if created:
            self._cache.drop(meta_key(tenant, session_id))
            steps.append(self._js.purge_stream(
                META_STREAM, subject=f"{META_SUBJECT_PREFIX}.{meta_key(tenant, session_id)}"))
        for outcome in await asyncio.gather(*steps, return_exceptions=True):
            if isinstance(outcome, (NatsError, TimeoutError)):
                log.warning("session %s: not all taken back: %s", session_id, str(outcome) or type(outcome).__name__)
            elif isinstance(outcome, BaseException):
                raise outcome

    async def _delete_messages(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            with contextlib.suppress(NatsError, TimeoutError):
                await self._js.delete_msg(LOG_STREAM, seq)

    async def append_system(self, tenant: str, session_id: str, content: str) -> StoredMessage | None:
        """A message of the service itself (role system), without an access check; None if the session is gone."""
        entry = await self.read_entry(tenant, session_id)
        if entry is None:
            return None
        message = StoredMessage(id=new_id(), role="system", content=content, created_at=time.time(),
                                tokens=self._counter.count(content), encoding=self._counter.name)
        ack = await self._publish(tenant, session_id, message)
        stored = replace(message, seq=ack.seq)
        self._pending.add(meta_key(tenant, session_id), stored)
        return stored

    @overload
    async def _publish(self, tenant: str, session_id: str, message: StoredMessage) -> PubAck: ...

    @overload
    async def _publish(self, tenant: str, session_id: str, message: StoredMessage, *,
                       after_seq: int) -> PubAck | None: ...

    async def _publish(self, tenant: str, session_id: str, message: StoredMessage, *,
                       after_seq: int = 0) -> PubAck | None:
        """Append to the log, counting its bytes against the tenant's quota; StorageFull when the log is.

        `after_seq`: only if the conversation's newest event is still that one (None, nothing stored, if not)."""
        subject, payload = log_subject(tenant, session_id), message.to_json()
        headers = {"Nats-Msg-Id": message.id}
        if after_seq:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(after_seq)
        try:
            ack = await self._js.publish(subject, payload, headers=headers)
        except ServiceUnavailableError as error:
            if error.err_code != STREAM_FULL:
                raise
            log.error("the conversation log is full (KEFU_MESSAGES_MAX_BYTES): new messages are refused")
            raise StorageFull("the conversation store is full; try again later") from None
        except BadRequestError as error:
            if not after_seq or error.err_code != WRONG_LAST_SEQUENCE:
                raise
            return None
        if self.usage is not None and not ack.duplicate:
            self.usage.add(tenant, len(subject) + len(payload) + MESSAGE_OVERHEAD_BYTES)
        return ack

    def _stored_size(self, tenant: str, content: str) -> int:
        """What a message of `content` adds to the tenant's usage, about (the envelope is left out)."""
        return len(log_subject(tenant, "0" * 32)) + len(content.encode()) + MESSAGE_OVERHEAD_BYTES

    async def _check_open_conversations(self, principal: Principal) -> None:
        """A visitor opens a conversation only while it has fewer than the limit open (issue 17)."""
        if not self._max_visitor_conversations:
            return
        session_ids = await self.index.sessions_of_visitor(principal.tenant, principal.subject)
        if len(session_ids) < self._max_visitor_conversations:
            return  # fewer than the limit of any status: no need to read them
        metas = await asyncio.gather(*(self.read_meta(principal.tenant, s) for s in session_ids
                                       if SESSION_ID_PATTERN.fullmatch(s)))
        open_count = sum(1 for meta in metas if meta is not None and meta.owner == principal.subject
                         and meta.state.status != "closed")
        if open_count >= self._max_visitor_conversations:
            raise QuotaExceeded(f"this visitor already has {open_count} open conversations; continue one of them")

    async def claim_answer(self, principal: Principal, session_id: str, message_id: str, holder: str,
                           lease_s: float) -> AnswerClaim:
        """The lease on answering the visitor message the AI owes (issue 17 item 7): granted to `holder`
        when it holds it already (a renewal) or when the lease ran out (its edge died mid-answer)."""
        if not 0 < lease_s <= MAX_ANSWER_LEASE_S:
            raise InvalidArgument(f"lease_s must be in (0, {MAX_ANSWER_LEASE_S:g}]")
        if len(holder) > 64:
            raise InvalidArgument("holder must be at most 64 characters")
        seen: tuple[SessionMeta, int] | None = await self._authorize_entry(principal, session_id)
        key = meta_key(principal.tenant, session_id)
        # The counters this process has not written yet (the visitor message owed, maybe) go into the write.
        pending = self._pending.take(key)
        written = False
        try:
            claim, written = await self._claim_with(key, principal, session_id, message_id, holder, lease_s, seen,
                                                    pending)
            return claim
        finally:
            if not written:
                self._pending.restore(key, pending)

    async def _claim_with(self, key: str, principal: Principal, session_id: str, message_id: str, holder: str,
                          lease_s: float, seen: tuple[SessionMeta, int] | None,
                          pending: Pending | None) -> tuple[AnswerClaim, bool]:
        for attempt in range(CAS_ATTEMPTS):
            if seen is None:
                seen = await self.read_entry(principal.tenant, session_id)
                if seen is None:
                    raise NotFound("no such session")
            meta, revision = seen
            if pending is not None:
                meta = meta.with_delta(pending.delta, self._answer_lease_s)
            if meta.state.status == "ai":
                meta = await self._owed_from_log(principal.tenant, session_id, meta)
            owed, now = meta.owed, time.time()
            if owed is None or meta.state.status != "ai" or (message_id and owed.message_id != message_id):
                return AnswerClaim(False, "", 0.0, meta.state), False
            if owed.holder != holder and owed.until > now:
                return AnswerClaim(False, owed.message_id, owed.until - now, meta.state), False
            updated = replace(meta, owed=replace(owed, holder=holder, until=now + lease_s))
            try:
                new_revision = await self._meta.update(key, updated.to_json(), last=revision)
            except KeyWrongLastSequenceError:
                seen = None
                if attempt:
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** attempt)))
                continue
            self._cache.put(key, updated, new_revision)
            return AnswerClaim(True, owed.message_id, 0.0, meta.state), True
        raise Unavailable(f"conversation {session_id}: too many concurrent changes")

    async def transition(self, principal: Principal, session_id: str, change: Change) -> TransitionResult:
        """Change the conversation's status by CAS and store its `state` event (NotFound as every read)."""
        seen = await self._authorize_entry(principal, session_id)
        return await self._apply(principal.tenant, session_id, principal, change, seen)

    async def transition_as_service(self, tenant: str, session_id: str, change: Change,
                                    seen: tuple[SessionMeta, int] | None = None) -> TransitionResult | None:
        """A change the service itself makes (timers); None if the session is gone."""
        if seen is None:
            seen = await self.read_entry(tenant, session_id)
            if seen is None:
                return None
        try:
            return await self._apply(tenant, session_id, None, change, seen)
        except NotFound:
            return None

    async def _apply(self, tenant: str, session_id: str, actor: Principal | None, change: Change,
                     seen: tuple[SessionMeta, int] | None) -> TransitionResult:
        """Decide against the current state and write it by CAS; on a lost CAS read and decide again.

        The state event's counters go into the same write, so a change costs one KV write;
        counter batches and changes meet in the CAS and never overwrite each other.
        """
        key = meta_key(tenant, session_id)
        # The counters this process has not written yet go into the same write.
        pending = self._pending.take(key)
        try:
            result = await self._apply_with(tenant, session_id, actor, change, seen, pending)
        except BaseException:
            self._pending.restore(key, pending)
            raise
        if result.unchanged:
            self._pending.restore(key, pending)
        return result

    async def _apply_with(self, tenant: str, session_id: str, actor: Principal | None, change: Change,
                          seen: tuple[SessionMeta, int] | None, pending: Pending | None) -> TransitionResult:
        key = meta_key(tenant, session_id)
        for attempt in range(CAS_ATTEMPTS):
            if seen is None:
                seen = await self.read_entry(tenant, session_id)
                if seen is None:
                    raise NotFound("no such session")
            meta, revision = seen
            now = time.time()
            state = decide(meta.state, actor, change, now)
            if state is None:
                return TransitionResult(meta.state, meta.state, None, meta, revision)
            # A random id, not one derived from the version: a caller chooses its own message ids,
            # and one that guessed a derived id would have the event dropped as a duplicate.
            event = StoredMessage(id=new_id(), role="system",
                                  content=describe(state), created_at=now, tokens=0,
                                  encoding=self._counter.name, kind="state", state=state)
            delta = MetaDelta()
            delta.add(event)
            if pending is not None:
                delta.merge(pending.delta)
            # A change of state settles what the AI owed: an agent has it, or it goes back to the AI later.
            updated = replace(meta.with_delta(delta), state=state, owed=None)
            try:
                new_revision = await self._meta.update(key, updated.to_json(), last=revision)
            except KeyWrongLastSequenceError:
                seen = None
                if attempt:
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** attempt)))
                continue
            self._cache.put(key, updated, new_revision)
            ack = await self._publish(tenant, session_id, event)
            await self.index.project(tenant, session_id, updated, self._rereader(tenant, session_id))
            await self._arm(tenant, session_id, updated)
            return TransitionResult(state, meta.state, replace(event, seq=ack.seq), updated, new_revision)
        raise Unavailable(f"conversation {session_id}: too many concurrent changes")

    async def _arm(self, tenant: str, session_id: str, meta: SessionMeta) -> None:
        if self.schedule is None:
            return
        try:
            await self.schedule.changed(tenant, session_id, meta)
        except (NatsError, TimeoutError) as error:
            # The change itself is stored; without its timer the conversation still ends with the TTL.
            log.warning("conversation %s: timers not armed: %s", session_id, str(error) or type(error).__name__)

    async def purge(self, tenant: str, session_id: str, owner: str, seen: tuple[SessionMeta, int] | None) -> bool:
        """Erase a conversation past its retention: metadata, messages, index entries and timers.

        `seen`: the metadata and revision the caller judged; its removal is a CAS against that
        revision, so a conversation a visitor reopened meanwhile is kept (False). None: the
        metadata is gone already (TTL), the rest is removed all the same.
        """
        key = meta_key(tenant, session_id)
        if seen is not None:
            try:
                await self._meta.delete(key, last=seen[1])
            except KeyWrongLastSequenceError:
                return False
        await self._erase(tenant, session_id, owner)
        return True

    async def _erase(self, tenant: str, session_id: str, owner: str) -> None:
        # A subject purge leaves no tombstone: nothing of the session remains, and no
        # MaxAge marker appears later to be mistaken for an expiry.
        key = meta_key(tenant, session_id)
        self._cache.drop(key)
        self._pending.take(key)  # its messages go with it
        await self._js.purge_stream(META_STREAM, subject=f"{META_SUBJECT_PREFIX}.{key}")
        await self._js.purge_stream(LOG_STREAM, subject=log_subject(tenant, session_id))
        await self.index.remove(tenant, session_id, owner)
        if self.schedule is not None:
            await self.schedule.cancel(tenant, session_id)

    async def last_event_at(self, tenant: str, session_id: str, meta: SessionMeta) -> float:
        """When the conversation's newest event was stored: its metadata's time, or newer when counters
        are still on their way (here or on another replica: the log's newest message says)."""
        newest = self._view(meta_key(tenant, session_id), meta).updated_at
        event = await self._newest_event(tenant, session_id)
        return max(newest, event.created_at) if event is not None else newest

    async def _newest_event(self, tenant: str, session_id: str) -> StoredMessage | None:
        try:
            raw = await self._js.get_last_msg(LOG_STREAM, log_subject(tenant, session_id))
        except NotFoundError:
            return None
        return StoredMessage.from_json(raw.data, raw.seq or 0) if raw.data else None

    async def _owed_from_log(self, tenant: str, session_id: str, meta: SessionMeta) -> SessionMeta:
        """The metadata with what the AI owes as the log says it: counters (the owed message, or the
        answer that paid it) may still be on their way from another replica, or lost with a crashed one."""
        if not self._answer_lease_s:
            return meta
        newest = await self._newest_event(tenant, session_id)
        if newest is None or newest.kind == "note" or newest.seq <= (meta.owed.seq if meta.owed is not None else 0):
            return meta
        if newest.role == "user" and newest.kind == "message":
            return replace(meta, owed=AnswerOwed(newest.id, newest.seq, "", newest.created_at + self._answer_lease_s))
        return replace(meta, owed=None)  # something was said after it: paid

    async def read_meta(self, tenant: str, session_id: str) -> SessionMeta | None:
        """The session's metadata without an access check (internal callers); None if gone."""
        entry = await self.read_entry(tenant, session_id)
        return self._view(meta_key(tenant, session_id), *entry) if entry is not None else None

    async def read_entry(self, tenant: str, session_id: str) -> tuple[SessionMeta, int] | None:
        """The metadata and its KV revision without an access check (internal callers); None if gone."""
        return await self._read_entry(meta_key(tenant, session_id))

    async def _read_entry(self, key: str) -> tuple[SessionMeta, int] | None:
        try:
            entry = await self._meta.get(key)
        except KeyNotFoundError:
            self._cache.drop(key)
            return None
        if not entry.value:
            self._cache.drop(key)
            return None  # an expiry marker
        assert entry.revision is not None
        meta = SessionMeta.from_json(entry.value)
        self._cache.put(key, meta, entry.revision)
        return meta, entry.revision

    def _rereader(self, tenant: str, session_id: str) -> Callable[[], Awaitable[SessionMeta | None]]:
        return lambda: self.read_meta(tenant, session_id)

    async def _first_copy(self, principal: Principal, session_id: str, created: bool, seq: int) -> AppendResult:
        """A retried message id: answer with the first copy, wherever the caller may see it.

        Message ids are unique stream-wide, so the first copy may sit in another session: the
        caller's own earlier one (a first message retried without its session id: the empty
        session just created is dropped again), or, if an internal caller reused an id,
        someone else's, which is refused without telling anything about it.
        """
        raw = await self._js.get_msg(LOG_STREAM, seq=seq)
        assert raw.data is not None
        if raw.subject != log_subject(principal.tenant, session_id):
            if created:  # no tombstone, as in delete(): the session never existed
                self._cache.drop(meta_key(principal.tenant, session_id))
                await self._js.purge_stream(
                    META_STREAM, subject=f"{META_SUBJECT_PREFIX}.{meta_key(principal.tenant, session_id)}")
                await self.index.remove(principal.tenant, session_id, principal.subject)
            prefix = log_subject(principal.tenant, "")
            subject = raw.subject or ""
            original = subject.removeprefix(prefix) if subject.startswith(prefix) else ""
            try:
                await self._authorize(principal, original)
            except NotFound:
                raise InvalidArgument("message_id is already taken") from None
            session_id, created = original, False
        return AppendResult(session_id, StoredMessage.from_json(raw.data, seq), created, duplicate=True)

    async def messages(self, principal: Principal, session_id: str) -> tuple[SessionMeta, list[StoredMessage]]:
        """The session's kept events the principal may see, oldest first (JetStream sequence =
        order of acknowledgement): no void AI replies, and no notes for a visitor."""
        meta = await self._authorize(principal, session_id)
        return meta, visible(await self._history(principal.tenant, session_id, meta), principal.is_staff)

    async def _history(self, tenant: str, session_id: str, meta: SessionMeta) -> list[StoredMessage]:
        if meta.message_count == 0:
            return []
        return await self._read_history(log_subject(tenant, session_id))

    async def delete(self, principal: Principal, session_id: str) -> int:
        meta = await self._authorize(principal, session_id)
        if meta.owner != principal.subject:
            # Staff may read a visitor's conversation, but erasing it is the owner's right.
            raise NotFound("no such session")
        kept = min(meta.message_count, self._max_history)
        await self._erase(principal.tenant, session_id, meta.owner)
        return kept

    async def watch_expired(self, on_expired: Callable[[], None], *, fetch_timeout_s: float = 5.0,
                            pause_s: float = EXPIRY_PAUSE_S) -> None:
        """Call `on_expired` once per session whose metadata aged out (idle TTL); runs until cancelled.

        JetStream removes aged-out messages silently; with the bucket's limit markers the
        server writes a `Nats-Marker-Reason: MaxAge` message in the key's place, which a
        durable consumer shared by all replicas sees once. Deleted sessions are purged
        without a tombstone, so they are not counted. Without markers (server < 2.11)
        this returns at once and nothing is counted.
        """
        if not self.expiry_markers:
            return
        while True:
            try:
                subscription = await self._js.pull_subscribe(
                    f"{META_SUBJECT_PREFIX}.>", durable=EXPIRY_CONSUMER, stream=META_STREAM,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.NONE,
                                          headers_only=True))
                try:
                    while True:
                        if not (batch := await fetch_batch(subscription, EXPIRY_BATCH, fetch_timeout_s)):
                            continue
                        for message in batch:
                            if message.headers and message.headers.get("Nats-Marker-Reason") == "MaxAge":
                                on_expired()
                        if len(batch) < EXPIRY_BATCH:
                            # Caught up: let the next updates gather. Every append rewrites a key, so
                            # fetching at once would wake this process once more per message.
                            await asyncio.sleep(pause_s)
                finally:
                    await subscription.unsubscribe()
            except (NatsError, TimeoutError) as error:
                # A restarted nats-server: subscribe again once the client reconnects.
                log.warning("expiry watch: %s; retrying", str(error) or type(error).__name__)
                await asyncio.sleep(1.0)
            except Exception:
                # A metric is not worth the service: log, pause, go on.
                log.exception("expiry watch failed; retrying")
                await asyncio.sleep(5.0)

    async def _authorize(self, principal: Principal, session_id: str) -> SessionMeta:
        meta, revision = await self._authorize_entry(principal, session_id)
        return self._view(meta_key(principal.tenant, session_id), meta, revision)

    async def _authorize_entry(self, principal: Principal, session_id: str) -> tuple[SessionMeta, int]:
        """The session's metadata and its KV revision, if `principal` may see it; else NotFound."""
        if not SESSION_ID_PATTERN.fullmatch(session_id):
            raise NotFound("no such session")
        # An expiry marker stands where the key was until the marker itself expires: gone too.
        entry = await self._read_entry(meta_key(principal.tenant, session_id))
        if entry is None or not _may_see(principal, entry[0]):
            raise NotFound("no such session")
        return entry

    def _cached_entry(self, principal: Principal, session_id: str) -> tuple[SessionMeta, int] | None:
        """As _authorize_entry from this process's recent view, without a round trip (appends, whose CAS
        catches a stale one); None when it has none."""
        if not SESSION_ID_PATTERN.fullmatch(session_id):
            raise NotFound("no such session")
        entry = self._cache.get(meta_key(principal.tenant, session_id))
        if entry is not None and not _may_see(principal, entry[0]):
            raise NotFound("no such session")
        return entry

    async def _flush(self, key: str) -> None:
        """Write what is pending for `key` (pending.py calls it once a window)."""
        pending = self._pending.take(key)
        if pending is None:
            return
        try:
            written = await self._write_meta(key, pending.delta, self._cache.get(key))
        except (KefuError, NatsError, TimeoutError) as error:
            log.warning("session %s: counters not written yet: %s", key, str(error) or type(error).__name__)
            self._pending.restore(key, pending)
            return
        if written is None:
            # Deleted or expired meanwhile: its late messages must not outlive it.
            await self._delete_messages(pending.seqs)
            return
        if written.state.status == "waiting_human" and pending.delta.preview_seq:
            # The queue shows the newest visitor message of each waiting conversation (a held one's
            # agent sees every message live, so its entry is not refreshed per message).
            tenant, session_id = key.split(".", 1)
            await self.index.project(tenant, session_id, written, self._rereader(tenant, session_id), moved=False)

    async def flush(self) -> None:
        """Write every pending counter now (shutdown, or a test about to look at the metadata in KV)."""
        await self._pending.flush_all()

    async def close(self) -> None:
        await self.flush()

    def _view(self, key: str, meta: SessionMeta, revision: int = 0) -> SessionMeta:
        """The metadata at `revision` with what this process has not written into it yet."""
        delta = MetaDelta()
        writing = self._writing.get(key)
        if writing is not None and writing[1] == revision:
            delta.merge(writing[0])  # a flush on its way, not yet in the revision read
        pending = self._pending.peek(key)
        if pending is not None:
            delta.merge(pending)
        return meta.with_delta(delta, self._answer_lease_s) if delta.messages else meta

    async def _write_meta(self, key: str, delta: MetaDelta,
                          seen: tuple[SessionMeta, int] | None) -> SessionMeta | None:
        for attempt in range(CAS_ATTEMPTS):
            if seen is None:
                seen = await self._read_entry(key)
                if seen is None:
                    return None  # deleted or expired meanwhile
            meta, revision = seen
            updated = meta.with_delta(delta, self._answer_lease_s)
            writing = self._writing[key] = (delta, revision)
            try:
                new_revision = await self._meta.update(key, updated.to_json(), last=revision)
                self._cache.put(key, updated, new_revision)
                return updated
            except KeyWrongLastSequenceError:
                seen = None
                if attempt:
                    # Another replica keeps writing: back off with jitter so writers spread out.
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** attempt)))
            finally:
                if self._writing.get(key) is writing:
                    del self._writing[key]
        raise Unavailable(f"session {key}: gave up updating counters after {CAS_ATTEMPTS} conflicts")

    async def _read_history(self, subject: str) -> list[StoredMessage]:
        if self.batch_reads:
            return await self._read_subject_batch(subject)
        return await self._read_subject(subject)

    async def _read_subject_batch(self, subject: str) -> list[StoredMessage]:
        """One request and one round trip for the whole history (paged if the server caps a
        batch). Unlike a consumer per read, it creates no server state, which matters in a
        clustered JetStream."""
        found = await direct_get(self._nc, LOG_STREAM, {"batch": self._max_history, "next_by_subj": subject})
        return [StoredMessage.from_json(m.data, int((m.headers or {})["Nats-Sequence"])) for m in found]

    async def _read_subject(self, subject: str) -> list[StoredMessage]:
        # Servers before 2.11: a short-lived named consumer, deleted right after: one
        # create, one or two fetches and one delete, however long the history.
        name = new_id()
        await self._js.add_consumer(LOG_STREAM, ConsumerConfig(
            name=name, filter_subject=subject, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True))
        subscription = await self._js.pull_subscribe_bind(name=name, stream=LOG_STREAM)
        messages: list[StoredMessage] = []
        try:
            while True:
                batch = await fetch_batch(subscription, self._max_history, 2.0)
                for raw in batch:
                    messages.append(StoredMessage.from_json(raw.data, raw.metadata.sequence.stream))
                if not batch or batch[-1].metadata.num_pending == 0:
                    break
        finally:
            await subscription.unsubscribe()
            await self._js.delete_consumer(LOG_STREAM, name)
        return messages


def meta_reads_direct(replicas: int) -> bool:
    """Whether metadata is read with direct gets: only from a stream with one replica, which is then the one
    that answers, so a read sees every write acknowledged before it. With more, any replica may answer a
    direct get, a follower a moment behind: a state check (a claim, a close) must not read that."""
    return replicas == 1


async def _reconcile_meta_stream(nc: NatsClient, ttl_s: float, marker_ttl_s: float | None,
                                 replicas: int) -> bool:
    """An existing bucket keeps the config it was created with: bring TTL, markers, replicas and direct gets
    up to date; whether it changed the stream."""
    js = nc.jetstream()
    config = (await js.stream_info(META_STREAM)).config
    direct = meta_reads_direct(replicas)
    if (config.max_age == ttl_s and (config.subject_delete_marker_ttl or None) == marker_ttl_s
            and (config.num_replicas or 1) == replicas and bool(config.allow_direct) == direct):
        return False
    config.num_replicas = replicas
    config.allow_direct = direct
    log.info("updating %s: max age %s -> %s s, %s replica(s), direct gets %s", META_STREAM, config.max_age, ttl_s,
             replicas, "allowed" if direct else "not allowed")
    config.max_age = ttl_s
    config.duplicate_window = min(config.duplicate_window or MAX_DUPLICATE_WINDOW_S, ttl_s)
    config.subject_delete_marker_ttl = marker_ttl_s
    if marker_ttl_s:
        config.allow_msg_ttl = True
    await js.update_stream(config)
    return True


def meta_key(tenant: str, session_id: str) -> str:
    return f"{tenant}.{session_id}"


def _may_see(principal: Principal, meta: SessionMeta) -> bool:
    return meta.tenant == principal.tenant and (meta.owner == principal.subject or principal.is_staff)


def _failure(task: asyncio.Task[T]) -> BaseException | None:
    """The error a finished step raised (None: it succeeded or was cancelled with its caller)."""
    return None if task.cancelled() else task.exception()
