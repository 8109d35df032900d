"""A tenant's documents in JetStream: records and tenant state in KV, file bytes and built indexes in Object Stores.

Layout (every key and object name starts with the tenant, so nothing is shared between tenants):

- KV `kefu_kb_documents`, key `<tenant>.<document_id>`: a DocumentRecord (JSON).
- KV `kefu_kb_tenants`, key `<tenant>.index`: the IndexState answers use (knowledge version, index object,
  documents in it, documents deleted since it was built); key `<tenant>.usage`: documents and bytes (quotas).
- Object Store `kefu_kb_files`, `<tenant>/<document_id>/<nuid>`: an uploaded file, one object per version.
- Object Store `kefu_kb_indexes`, `<tenant>/<nuid>`: a built index (KnowledgeIndex.to_bytes()).

Every change of a key is a compare-and-set on its revision: worker replicas may race.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import io
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from services.common.errors import InvalidArgument, KefuError, NotFound
from services.common.kv_values import live_values
from services.common.nats_client import ensure_key_value

log = logging.getLogger(__name__)

DOCUMENTS_BUCKET = "kefu_kb_documents"
TENANTS_BUCKET = "kefu_kb_tenants"
FILES_BUCKET = "kefu_kb_files"
OBJECT_READ_TIMEOUT_S = 60.0
"""Longest read of one stored file or index (a 10 MB object takes well under a second on a healthy server)."""
INDEXES_BUCKET = "kefu_kb_indexes"

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Tenants and document ids: one KV key token each (no dots, no wildcards)."""
MAX_TITLE_CHARS = 300
MAX_URL_CHARS = 2000
MAX_FILENAME_CHARS = 255
CAS_ATTEMPTS = 50
DEL_OPERATIONS = frozenset({"DEL", "PURGE"})

Status = Literal["queued", "indexing", "ready", "failed"]


class QuotaExceeded(KefuError):
    """A tenant limit (documents or bytes) would be passed; `limit` names the setting."""

    code = "quota_exceeded"

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class DocumentTooLarge(KefuError):
    code = "body_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the document has {size} bytes; KEFU_KB_MAX_DOCUMENT_BYTES allows {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Limits:
    max_document_bytes: int = 10 * 1024 * 1024
    max_documents: int = 1000
    max_tenant_bytes: int = 200 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    document_id: str
    title: str
    url: str
    filename: str
    format: str
    status: Status
    version: int
    """The newest stored version; its bytes are the object `blob`."""
    bytes: int
    content_hash: str
    blob: str
    updated_at: float
    error: str = ""
    serving_version: int = 0
    """The version in the published index (0: none); older than `version` while a newer is queued or failed."""
    serving_blob: str = ""
    chunks: int = 0
    """Chunks of the serving version."""

    # builtins.bytes: the field `bytes` above shadows the type inside this class.
    def to_json(self) -> builtins.bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: builtins.bytes) -> DocumentRecord:
        return cls(**json.loads(raw))


@dataclass(frozen=True, slots=True)
class IndexState:
    """What a tenant's answers use: `version` changes with every publish and every delete (cache keys hold it)."""

    version: int = 0
    index: str = ""
    """Object of the built index in INDEXES_BUCKET; "" when the tenant has no chunks."""
    documents: dict[str, int] = field(default_factory=dict)
    """Document id -> the version of it inside `index`."""
    removed: tuple[str, ...] = ()
    """Documents deleted since `index` was built: their hits must be dropped until the next build."""

    def to_json(self) -> bytes:
        return json.dumps({"version": self.version, "index": self.index, "documents": self.documents,
                           "removed": list(self.removed)}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> IndexState:
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(int(data.get("version", 0)), str(data.get("index", "")),
                   {str(k): int(v) for k, v in dict(data.get("documents", {})).items()},
                   tuple(str(d) for d in data.get("removed", ())))


@dataclass(frozen=True, slots=True)
class Usage:
    documents: int = 0
    bytes: int = 0


def new_document_id() -> str:
    return secrets.token_hex(16)


def check_id(value: str, what: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(f"{what} must be 1-64 letters, digits, '_' or '-'")
    return value


def document_key(tenant: str, document_id: str) -> str:
    return f"{tenant}.{document_id}"


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def ensure_object_store(js: JetStreamContext, config: ObjectStoreConfig) -> ObjectStore:
    """Open an Object Store, creating it on first use (two processes racing to create it is fine)."""
    assert config.bucket
    try:
        return await js.object_store(config.bucket)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_object_store(config.bucket, config)
    except BadRequestError:
        return await js.object_store(config.bucket)


class KnowledgeStore:
    """Records, tenant state and bytes of every tenant's documents; stateless apart from its handles."""

    def __init__(self, js: JetStreamContext, documents: KeyValue, tenants: KeyValue, files: ObjectStore,
                 indexes: ObjectStore, limits: Limits, *, clock: Callable[[], float] = time.time,
                 object_timeout_s: float = OBJECT_READ_TIMEOUT_S) -> None:
        self._js = js
        self.object_timeout_s = object_timeout_s
        self.documents = documents
        self.tenants = tenants
        self._files = files
        self._indexes = indexes
        self.limits = limits
        self._clock = clock

    @classmethod
    async def open(cls, nc: NatsClient, limits: Limits, *, replicas: int = 1,
                   timeout_s: float = 10.0) -> KnowledgeStore:
        js = nc.jetstream(timeout=timeout_s)

        def kv(bucket: str) -> KeyValueConfig:
            return KeyValueConfig(bucket=bucket, history=1, replicas=replicas, storage=StorageType.FILE)

        def objects(bucket: str) -> ObjectStoreConfig:
            return ObjectStoreConfig(bucket=bucket, replicas=replicas, storage=StorageType.FILE)

        documents = await ensure_key_value(js, kv(DOCUMENTS_BUCKET))
        tenants = await ensure_key_value(js, kv(TENANTS_BUCKET))
        files = await ensure_object_store(js, objects(FILES_BUCKET))
        indexes = await ensure_object_store(js, objects(INDEXES_BUCKET))
        return cls(js, documents, tenants, files, indexes, limits)

    # ------------------------------------------------------------------ records

    async def record(self, tenant: str, document_id: str) -> tuple[DocumentRecord, int] | None:
        """The record and its revision, or None when the tenant has no such document."""
        try:
            entry = await self.documents.get(document_key(tenant, document_id))
        except KeyNotFoundError:
            return None
        if not entry.value or entry.operation in DEL_OPERATIONS:
            return None
        return DocumentRecord.from_json(entry.value), entry.revision or 0

    async def get(self, tenant: str, document_id: str) -> DocumentRecord:
        found = await self.record(check_id(tenant, "tenant"), document_id) if ID_PATTERN.fullmatch(document_id) \
            else None
        if found is None:
            raise NotFound("no such document")
        return found[0]

    async def records(self, tenant: str, timeout_s: float = 10.0) -> list[tuple[DocumentRecord, int]]:
        """Every live record of the tenant with its revision, ordered by document id.

        Never from a KV watch (see live_values): an empty list read that way would make ingestion drop every
        document of the tenant from its index."""
        found: list[tuple[DocumentRecord, int]] = []
        for value in await live_values(self._js, DOCUMENTS_BUCKET, f"{tenant}.*", timeout_s=timeout_s):
            if not value.value:
                continue
            try:
                found.append((DocumentRecord.from_json(value.value), value.revision))
            except (ValueError, TypeError):
                log.warning("ignoring a malformed knowledge record at %s", value.key)
        found.sort(key=lambda pair: pair[0].document_id)
        return found

    async def update_record(self, tenant: str, document_id: str,
                            change: Callable[[DocumentRecord], DocumentRecord | None]) -> DocumentRecord | None:
        """Apply `change` to the current record with compare-and-set, again on a lost race; None if it is gone
        or `change` returned None (nothing to write)."""
        key = document_key(tenant, document_id)
        for _ in range(CAS_ATTEMPTS):
            found = await self.record(tenant, document_id)
            if found is None:
                return None
            changed = change(found[0])
            if changed is None:
                return None
            try:
                await self.documents.update(key, changed.to_json(), last=found[1])
                return changed
            except KeyWrongLastSequenceError:
                continue
        raise KefuError(f"document {document_id}: too many concurrent updates")

    # ------------------------------------------------------------------ put and delete

    async def put(self, tenant: str, *, document_id: str, title: str, url: str, filename: str, format: str,
                  data: bytes, skip_unchanged: bool = False) -> DocumentRecord:
        """Store `data` as the document's next version (status queued) within the tenant's limits.

        `skip_unchanged`: when the newest version has the same bytes and url (and title, if one is given),
        store nothing and return that record (the seed folder, read by every replica at start)."""
        check_id(tenant, "tenant")
        check_id(document_id, "document_id")
        if len(data) > self.limits.max_document_bytes:
            raise DocumentTooLarge(len(data), self.limits.max_document_bytes)
        digest = content_hash(data)
        blob = ""
        try:
            for _ in range(CAS_ATTEMPTS):
                found = await self.record(tenant, document_id)
                old = found[0] if found else None
                if skip_unchanged and old is not None and old.content_hash == digest and old.url == url and (
                        not title or title == old.title):
                    await self._delete_file(blob)
                    return old
                await self._reserve(tenant, 0 if old else 1, len(data) - (old.bytes if old else 0))
                if not blob:
                    blob = f"{tenant}/{document_id}/{secrets.token_hex(12)}"
                    await self._files.put(blob, data)
                record = DocumentRecord(
                    document_id=document_id, title=title, url=url, filename=filename, format=format,
                    status="queued", version=(old.version + 1) if old else 1, bytes=len(data),
                    content_hash=digest, blob=blob, updated_at=self._clock(),
                    serving_version=old.serving_version if old else 0,
                    serving_blob=old.serving_blob if old else "", chunks=old.chunks if old else 0)
                try:
                    if found is None:
                        await self.documents.create(document_key(tenant, document_id), record.to_json())
                    else:
                        await self.documents.update(document_key(tenant, document_id), record.to_json(),
                                                    last=found[1])
                except KeyWrongLastSequenceError:
                    await self._reserve(tenant, 0 if old else -1, -(len(data) - (old.bytes if old else 0)),
                                        check=False)
                    continue
                if old is not None and old.blob not in (old.serving_blob, blob):
                    await self._delete_file(old.blob)  # a version that never served: nobody needs it
                return record
        except BaseException:
            await self._delete_file(blob)
            raise
        raise KefuError(f"document {document_id}: too many concurrent updates")

    async def delete(self, tenant: str, document_id: str) -> tuple[DocumentRecord, IndexState, int]:
        """Delete the record, then mark the document removed in the tenant's state (new knowledge version).

        In that order: a build that read the state before the mark fails its compare-and-set, and one
        that read it after the mark cannot have seen the record."""
        found = await self.record(check_id(tenant, "tenant"), document_id) if ID_PATTERN.fullmatch(
            document_id) else None
        while found is not None:
            try:
                await self.documents.delete(document_key(tenant, document_id), last=found[1])
                break
            except KeyWrongLastSequenceError:
                found = await self.record(tenant, document_id)
        if found is None:
            raise NotFound("no such document")
        record = found[0]
        state, revision = await self.change_state(tenant, lambda state: replace(
            state, version=state.version + 1, removed=tuple(sorted({*state.removed, document_id}))))
        await self._reserve(tenant, -1, -record.bytes, check=False)
        for blob in {record.blob, record.serving_blob} - {""}:
            await self._delete_file(blob)
        return record, state, revision

    # ------------------------------------------------------------------ tenant state and usage

    async def state(self, tenant: str) -> tuple[IndexState, int]:
        """The tenant's index state and its revision (0 when it has none yet)."""
        try:
            entry = await self.tenants.get(f"{tenant}.index")
        except KeyNotFoundError:
            return IndexState(), 0
        if entry.operation in DEL_OPERATIONS:
            return IndexState(), entry.revision or 0
        return IndexState.from_json(entry.value), entry.revision or 0

    async def publish(self, tenant: str, state: IndexState, last_revision: int) -> int | None:
        """Make `state` the tenant's if nobody changed it since `last_revision`; its new revision, or None."""
        try:
            if last_revision == 0:
                return await self.tenants.create(f"{tenant}.index", state.to_json())
            return await self.tenants.update(f"{tenant}.index", state.to_json(), last=last_revision)
        except KeyWrongLastSequenceError:
            return None

    async def change_state(self, tenant: str, change: Callable[[IndexState], IndexState]) -> tuple[IndexState, int]:
        for _ in range(CAS_ATTEMPTS):
            state, revision = await self.state(tenant)
            changed = change(state)
            new_revision = await self.publish(tenant, changed, revision)
            if new_revision is not None:
                return changed, new_revision
        raise KefuError(f"tenant {tenant}: too many concurrent index changes")

    async def usage(self, tenant: str) -> tuple[Usage, int]:
        try:
            entry = await self.tenants.get(f"{tenant}.usage")
        except KeyNotFoundError:
            return Usage(), 0
        data = json.loads(entry.value or b"{}")
        return Usage(int(data.get("documents", 0)), int(data.get("bytes", 0))), entry.revision or 0

    async def _reserve(self, tenant: str, documents: int, size: int, *, check: bool = True) -> None:
        """Add to the tenant's usage; with `check`, refuse growth past a limit (QuotaExceeded)."""
        for _ in range(CAS_ATTEMPTS):
            usage, revision = await self.usage(tenant)
            new = Usage(max(0, usage.documents + documents), max(0, usage.bytes + size))
            if check and documents > 0 and new.documents > self.limits.max_documents:
                raise QuotaExceeded(f"the tenant has {usage.documents} documents; KEFU_KB_MAX_DOCUMENTS allows "
                                    f"{self.limits.max_documents}", "KEFU_KB_MAX_DOCUMENTS")
            if check and size > 0 and new.bytes > self.limits.max_tenant_bytes:
                raise QuotaExceeded(f"the tenant's documents would take {new.bytes} bytes; "
                                    f"KEFU_KB_MAX_TENANT_BYTES allows {self.limits.max_tenant_bytes}",
                                    "KEFU_KB_MAX_TENANT_BYTES")
            value = json.dumps({"documents": new.documents, "bytes": new.bytes}).encode()
            try:
                if revision == 0:
                    await self.tenants.create(f"{tenant}.usage", value)
                else:
                    await self.tenants.update(f"{tenant}.usage", value, last=revision)
                return
            except KeyWrongLastSequenceError:
                continue
        raise KefuError(f"tenant {tenant}: too many concurrent uploads")

    # ------------------------------------------------------------------ bytes

    async def read_file(self, name: str) -> bytes | None:
        """An uploaded file's bytes, or None when it is gone (deleted meanwhile)."""
        return await _read_object(self._files, name, self.object_timeout_s)

    async def write_index(self, tenant: str, data: bytes) -> str:
        name = f"{tenant}/{secrets.token_hex(12)}"
        await self._indexes.put(name, data)
        return name

    async def read_index(self, name: str) -> bytes | None:
        return await _read_object(self._indexes, name, self.object_timeout_s)

    async def delete_index(self, name: str) -> None:
        await _delete_object(self._indexes, name)

    async def delete_file(self, name: str) -> None:
        await _delete_object(self._files, name)

    async def _delete_file(self, name: str) -> None:
        if name:
            await _delete_object(self._files, name)


async def _read_object(store: ObjectStore, name: str, timeout_s: float) -> bytes | None:
    """The object's bytes, None when it is gone; TimeoutError when they do not all come within `timeout_s`.

    nats-py's get reads the chunks with an ordered push consumer and no deadline: an object whose chunks
    are missing (purged, aged out) or a stalled consumer would hang the read, and with it an ingestion job
    whose keepalive then holds it from every other replica, forever."""
    if not name:
        return None
    buffer = io.BytesIO()
    try:
        async with asyncio.timeout(timeout_s):
            # writeinto: nats-py appends chunk to chunk with bytes +=, quadratic on a large object.
            await store.get(name, writeinto=buffer)
    except NotFoundError:
        return None
    except TimeoutError:
        raise TimeoutError(f"knowledge object {name} not read within {timeout_s:g} s") from None
    return buffer.getvalue()


async def _delete_object(store: ObjectStore, name: str) -> None:
    try:
        await store.delete(name)
    except NotFoundError:
        pass
    except Exception as error:  # a leftover object costs space, not correctness
        log.warning("could not delete knowledge object %s: %s", name, error)
