"""gRPC KnowledgeService: protobuf <-> the knowledge base, and its errors as status codes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TypeVar

import grpc
from nats.errors import Error as NatsError

from kefu.llm.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.common.errors import InvalidArgument, KefuError, NotFound, Unavailable
from services.llm_worker.kb.service import KnowledgeBase
from services.llm_worker.kb.store import DocumentRecord, DocumentTooLarge, QuotaExceeded
from services.llm_worker.knowledge.models import Chunk
from services.llm_worker.knowledge.parsing import UnsupportedFormat

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

SERVICE_NAME = knowledge_pb2.DESCRIPTOR.services_by_name["KnowledgeService"].full_name

# Most specific first: UnsupportedFormat is also an InvalidArgument.
_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (UnsupportedFormat, grpc.StatusCode.FAILED_PRECONDITION),
    (DocumentTooLarge, grpc.StatusCode.OUT_OF_RANGE),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_of(error: KefuError) -> grpc.StatusCode:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


@contextlib.asynccontextmanager
async def knowledge_errors(context: grpc.aio.ServicerContext[RequestT, ResponseT]) -> AsyncIterator[None]:
    try:
        yield
    except KefuError as error:
        code = status_of(error)
        if code is grpc.StatusCode.INTERNAL:
            log.warning("knowledge: %s", error.message)
            await context.abort(code, "internal error")
        await context.abort(code, error.message)
    except (NatsError, TimeoutError) as error:
        log.warning("knowledge store unavailable: %s", str(error) or type(error).__name__)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the knowledge store is not reachable")


def to_proto(record: DocumentRecord) -> knowledge_pb2.Document:
    return knowledge_pb2.Document(
        document_id=record.document_id, title=record.title, url=record.url, filename=record.filename,
        format=record.format, status=record.status, error=record.error, version=record.version,
        serving_version=record.serving_version, chunks=record.chunks, bytes=record.bytes,
        updated_at=datetime.fromtimestamp(record.updated_at, UTC).isoformat(timespec="seconds").replace(
            "+00:00", "Z"))


class KnowledgeServicer(knowledge_pb2_grpc.KnowledgeServiceServicer):
    def __init__(self, base: KnowledgeBase) -> None:
        self._base = base

    async def PutDocument(
        self, request: knowledge_pb2.PutDocumentRequest,
        context: grpc.aio.ServicerContext[knowledge_pb2.PutDocumentRequest, knowledge_pb2.PutDocumentResponse],
    ) -> knowledge_pb2.PutDocumentResponse:
        async with knowledge_errors(context):
            record = await self._base.put(
                request.tenant, document_id=request.document_id, title=request.title, url=request.url,
                filename=request.filename, content_type=request.content_type, data=request.content)
        return knowledge_pb2.PutDocumentResponse(document_id=record.document_id, version=record.version,
                                                 status=record.status)

    async def ListDocuments(
        self, request: knowledge_pb2.ListDocumentsRequest,
        context: grpc.aio.ServicerContext[knowledge_pb2.ListDocumentsRequest, knowledge_pb2.ListDocumentsResponse],
    ) -> knowledge_pb2.ListDocumentsResponse:
        async with knowledge_errors(context):
            page = await self._base.list(request.tenant, limit=request.limit, cursor=request.cursor)
        return knowledge_pb2.ListDocumentsResponse(documents=[to_proto(r) for r in page.documents],
                                                   next_cursor=page.next_cursor)

    async def GetDocument(
        self, request: knowledge_pb2.GetDocumentRequest,
        context: grpc.aio.ServicerContext[knowledge_pb2.GetDocumentRequest, knowledge_pb2.Document],
    ) -> knowledge_pb2.Document:
        async with knowledge_errors(context):
            record = await self._base.get(request.tenant, request.document_id)
        return to_proto(record)

    async def DeleteDocument(
        self, request: knowledge_pb2.DeleteDocumentRequest,
        context: grpc.aio.ServicerContext[knowledge_pb2.DeleteDocumentRequest, knowledge_pb2.DeleteDocumentResponse],
    ) -> knowledge_pb2.DeleteDocumentResponse:
        async with knowledge_errors(context):
            await self._base.delete(request.tenant, request.document_id)
        return knowledge_pb2.DeleteDocumentResponse()

    async def Search(
        self, request: knowledge_pb2.SearchRequest,
        context: grpc.aio.ServicerContext[knowledge_pb2.SearchRequest, knowledge_pb2.SearchResponse],
    ) -> knowledge_pb2.SearchResponse:
        async with knowledge_errors(context):
            hits = await self._base.search(request.tenant, request.query, request.k)
        return knowledge_pb2.SearchResponse(results=[knowledge_pb2.SearchResult(
            document_id=hit.chunk.document_id, title=hit.chunk.title, url=hit.chunk.url,
            chunk_id=hit.chunk.chunk_id, text=passage_text(hit.chunk), score=hit.score) for hit in hits])


def passage_text(chunk: Chunk) -> str:
    """What a search result shows: the passage, or an FAQ item's question(s) and its answer."""
    return f"{chunk.text}\n{chunk.answer}" if chunk.kind == "faq" and chunk.answer else chunk.text
