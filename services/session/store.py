"""Sessions in NATS JetStream: metadata in a KV bucket, messages in a stream per session subject.

- KV `kefu_sessions`, key `<tenant>.<session_id>`: owner and counters, updated by
  compare-and-set; the bucket's max age is the idle TTL, and every append rewrites the
  key, so a session expires when nobody wrote to it for that long.
- Stream `KEFU_MESSAGES`, subject `kefu.msg.<tenant>.<session_id>`: one message each.
  JetStream assigns the sequence, so concurrent appends are never lost nor reordered;
  `max_msgs_per_subject` bounds the history (oldest dropped first); `Nats-Msg-Id`
  makes a retried append with the same message id a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.common.errors import InvalidArgument, NotFound
from services.common.nats_client import ensure_key_value, ensure_stream
from services.session.models import (
    MESSAGE_ID_PATTERN, ROLES, SESSION_ID_PATTERN, Principal, SessionMeta, StoredMessage, new_id,
)
from services.session.tokens import TokenCounter

log = logging.getLogger(__name__)

META_BUCKET = "kefu_sessions"
MESSAGE_STREAM = "KEFU_MESSAGES"
MESSAGE_SUBJECT_PREFIX = "kefu.msg"
CAS_ATTEMPTS = 50


@dataclass(frozen=True, slots=True)
class AppendResult:
    session_id: str
    message: StoredMessage
    created: bool


class SessionStore:
    """Every operation is scoped to the principal: another owner's session is NotFound."""

    def __init__(self, nc: NatsClient, meta: KeyValue, counter: TokenCounter, *,
                 max_history: int, max_message_chars: int) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._meta = meta
        self._counter = counter
        self._max_history = max_history
        self._max_message_chars = max_message_chars

    @classmethod
    async def open(cls, nc: NatsClient, counter: TokenCounter, *, max_history: int,
                   max_message_chars: int, ttl_s: float) -> SessionStore:
        js = nc.jetstream()
        meta = await ensure_key_value(js, KeyValueConfig(
            bucket=META_BUCKET, history=1, ttl=ttl_s, storage=StorageType.FILE))
        await ensure_stream(js, StreamConfig(
            name=MESSAGE_STREAM, subjects=[f"{MESSAGE_SUBJECT_PREFIX}.>"], storage=StorageType.FILE,
            max_msgs_per_subject=max_history, max_age=ttl_s * 2, duplicate_window=120.0))
        return cls(nc, meta, counter, max_history=max_history, max_message_chars=max_message_chars)

    async def append(self, principal: Principal, session_id: str, role: str, content: str,
                     message_id: str = "") -> AppendResult:
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {sorted(ROLES)}")
        if not content:
            raise InvalidArgument("content must not be empty")
        if len(content) > self._max_message_chars:
            raise InvalidArgument(f"content is longer than {self._max_message_chars} characters")
        if message_id and not MESSAGE_ID_PATTERN.fullmatch(message_id):
            raise InvalidArgument("message_id must be 32 lowercase hex characters")
        created = not session_id
        if created:
            session_id = new_id()
            now = time.time()
            await self._meta.create(_meta_key(principal.tenant, session_id),
                                    SessionMeta(principal.tenant, principal.subject, now, now).to_json())
        else:
            await self._authorize(principal, session_id)
        message = StoredMessage(id=message_id or new_id(), role=role, content=content,
                                created_at=time.time(), tokens=self._counter.count(content))
        ack = await self._js.publish(_subject(principal.tenant, session_id), message.to_json(),
                                     headers={"Nats-Msg-Id": message.id})
        if ack.duplicate:
            raw = await self._js.get_msg(MESSAGE_STREAM, seq=ack.seq)
            assert raw.data is not None
            return AppendResult(session_id, StoredMessage.from_json(raw.data, ack.seq), created)
        stored = StoredMessage(message.id, role, content, message.created_at, message.tokens, ack.seq)
        await self._bump_meta(principal.tenant, session_id, stored)
        return AppendResult(session_id, stored, created)

    async def messages(self, principal: Principal, session_id: str) -> tuple[SessionMeta, list[StoredMessage]]:
        """The session's kept messages, oldest first."""
        meta = await self._authorize(principal, session_id)
        if meta.message_count == 0:
            return meta, []
        return meta, await self._read_subject(_subject(principal.tenant, session_id))

    async def delete(self, principal: Principal, session_id: str) -> int:
        meta = await self._authorize(principal, session_id)
        if meta.owner != principal.subject:
            # Staff may read a visitor's conversation, but erasing it is the owner's right.
            raise NotFound("no such session")
        kept = min(meta.message_count, self._max_history)
        await self._meta.purge(_meta_key(principal.tenant, session_id))
        await self._js.purge_stream(MESSAGE_STREAM, subject=_subject(principal.tenant, session_id))
        return kept

    async def _authorize(self, principal: Principal, session_id: str) -> SessionMeta:
        if not SESSION_ID_PATTERN.fullmatch(session_id):
            raise NotFound("no such session")
        try:
            entry = await self._meta.get(_meta_key(principal.tenant, session_id))
        except KeyNotFoundError:
            raise NotFound("no such session") from None
        if entry.value is None:
            raise NotFound("no such session")
        meta = SessionMeta.from_json(entry.value)
        if meta.tenant != principal.tenant or (meta.owner != principal.subject and not principal.is_staff):
            raise NotFound("no such session")
        return meta

    async def _bump_meta(self, tenant: str, session_id: str, message: StoredMessage) -> None:
        key = _meta_key(tenant, session_id)
        for _ in range(CAS_ATTEMPTS):
            try:
                entry = await self._meta.get(key)
            except KeyNotFoundError:
                return  # deleted or expired meanwhile; the message expires with the stream
            assert entry.value is not None and entry.revision is not None
            updated = SessionMeta.from_json(entry.value).with_message(message)
            try:
                await self._meta.update(key, updated.to_json(), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0)
        log.warning("session %s: gave up updating counters after %d conflicts", session_id, CAS_ATTEMPTS)

    async def _read_subject(self, subject: str) -> list[StoredMessage]:
        # A short-lived named consumer, deleted right after: one create, one or two
        # fetches and one delete, however long the history.
        name = new_id()
        await self._js.add_consumer(MESSAGE_STREAM, ConsumerConfig(
            name=name, filter_subject=subject, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True))
        subscription = await self._js.pull_subscribe_bind(name=name, stream=MESSAGE_STREAM)
        messages: list[StoredMessage] = []
        try:
            while True:
                try:
                    batch = await subscription.fetch(self._max_history, timeout=2.0)
                except NatsTimeoutError:
                    break
                for raw in batch:
                    messages.append(StoredMessage.from_json(raw.data, raw.metadata.sequence.stream))
                if not batch or batch[-1].metadata.num_pending == 0:
                    break
        finally:
            await subscription.unsubscribe()
            await self._js.delete_consumer(MESSAGE_STREAM, name)
        return messages

def _meta_key(tenant: str, session_id: str) -> str:
    return f"{tenant}.{session_id}"


def _subject(tenant: str, session_id: str) -> str:
    return f"{MESSAGE_SUBJECT_PREFIX}.{tenant}.{session_id}"
