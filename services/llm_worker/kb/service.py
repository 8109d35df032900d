"""The knowledge base's operations (put, list, get, delete, search), each scoped to one tenant."""

from __future__ import annotations

import base64
import binascii
import builtins
import logging
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.llm_worker.kb.ingest import JobQueue
from services.llm_worker.kb.library import KnowledgeLibrary
from services.llm_worker.kb.metrics import KnowledgeMetrics
from services.llm_worker.kb.store import (
    ID_PATTERN,
    MAX_FILENAME_CHARS,
    MAX_TITLE_CHARS,
    MAX_URL_CHARS,
    DocumentRecord,
    KnowledgeStore,
    check_id,
    new_document_id,
)
from services.llm_worker.knowledge.models import Hit
from services.llm_worker.knowledge.parsing import detect_format

log = logging.getLogger(__name__)

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_QUERY_CHARS = 2000
MAX_K = 50


@dataclass(frozen=True, slots=True)
class Page:
    documents: list[DocumentRecord]
    next_cursor: str


def encode_cursor(document_id: str) -> str:
    return base64.urlsafe_b64encode(document_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        document_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("cursor: not a cursor this API gave out") from None
    if not ID_PATTERN.fullmatch(document_id):
        raise InvalidArgument("cursor: not a cursor this API gave out")
    return document_id


class KnowledgeBase:
    def __init__(self, store: KnowledgeStore, queue: JobQueue, library: KnowledgeLibrary,
                 metrics: KnowledgeMetrics) -> None:
        self.store = store
        self._queue = queue
        self.library = library
        self._metrics = metrics

    async def put(self, tenant: str, *, document_id: str, title: str, url: str, filename: str,
                  content_type: str, data: bytes, skip_unchanged: bool = False) -> DocumentRecord:
        """Store a new version and queue its ingestion; UnsupportedFormat before anything is stored."""
        check_id(tenant, "tenant")
        document_id = document_id or new_document_id()
        check_id(document_id, "document_id")
        title, url, filename = title.strip(), url.strip(), filename.strip()
        for name, value, limit in (("title", title, MAX_TITLE_CHARS), ("url", url, MAX_URL_CHARS),
                                   ("filename", filename, MAX_FILENAME_CHARS)):
            if len(value) > limit:
                raise InvalidArgument(f"{name}: at most {limit} characters")
        if url and not url.startswith(("https://", "http://", "/")):
            raise InvalidArgument("url: must be an http(s) link or a path")
        document_format = detect_format(filename, content_type)
        record = await self.store.put(tenant, document_id=document_id, title=title, url=url, filename=filename,
                                      format=document_format.value, data=data, skip_unchanged=skip_unchanged)
        if record.status == "queued":
            self._metrics.documents.labels("queued").inc()
            await self._queue.enqueue(tenant)
        return record

    async def get(self, tenant: str, document_id: str) -> DocumentRecord:
        return await self.store.get(tenant, document_id)

    async def list(self, tenant: str, *, limit: int = 0, cursor: str = "") -> Page:
        limit = limit or DEFAULT_PAGE
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit: must be 1..{MAX_PAGE}")
        after = decode_cursor(cursor) if cursor else ""
        records = [record for record, _ in await self.store.records(check_id(tenant, "tenant"))
                   if record.document_id > after]
        page = records[:limit]
        more = len(records) > limit
        return Page(page, encode_cursor(page[-1].document_id) if more else "")

    async def delete(self, tenant: str, document_id: str) -> DocumentRecord:
        """Delete: this process stops retrieving it at once, the others when their watch sees the new state."""
        record, state, revision = await self.store.delete(tenant, document_id)
        self.library.published(tenant, state, revision)
        self._metrics.documents.labels("deleted").inc()
        await self._queue.enqueue(tenant)  # the rebuild drops its chunks for good
        return record

    async def search(self, tenant: str, query: str, k: int = 0) -> builtins.list[Hit]:  # `list`: a method here
        check_id(tenant, "tenant")
        k = k or 5
        if not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k: must be 1..{MAX_K}")
        query = query.strip()
        if not query or len(query) > MAX_QUERY_CHARS:
            raise InvalidArgument(f"query: 1..{MAX_QUERY_CHARS} characters")
        return await self.library.search(tenant, query, k)
