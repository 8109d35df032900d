"""/v1/knowledge/documents (admins) and /v1/knowledge/search (staff): the tenant's knowledge base."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Self

import grpc
import pydantic
from aiohttp import BodyPartReader, web

from gateway import keys
from gateway.bodies import read_json_body
from gateway.clients import request_metadata
from gateway.errors import ApiError, BodyTooLarge, InvalidRequest, api_error_from_grpc
from gateway.responses import json_response
from kefu.llm.v1 import knowledge_pb2

ID = r"^[A-Za-z0-9_-]{1,64}$"
ID_PATTERN = re.compile(ID)
MAX_TITLE_CHARS = 300
MAX_URL_CHARS = 2000
MAX_FILENAME_CHARS = 255
MAX_FIELD_BYTES = 4096
"""A multipart text field (title, url, document_id)."""
MAX_QUERY_CHARS = 2000
UPLOAD_TIMEOUT_S = 60.0
"""Storing a document of megabytes in JetStream takes longer than an ordinary call."""
ENVELOPE_BYTES = 64 * 1024
"""Room beside the document in a request body (JSON fields, multipart headers)."""

# The worker's status codes, as this API's errors.
_ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.INVALID_ARGUMENT: (422, "invalid_request"),
    grpc.StatusCode.FAILED_PRECONDITION: (415, "unsupported_media_type"),
    grpc.StatusCode.OUT_OF_RANGE: (413, "body_too_large"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (409, "quota_exceeded"),
}


class DocumentBody(pydantic.BaseModel):
    """JSON upload: `text`, or a file as `filename` + `content_base64`."""

    model_config = pydantic.ConfigDict(extra="forbid")
    title: str = pydantic.Field(default="", max_length=MAX_TITLE_CHARS)
    text: str | None = pydantic.Field(default=None, min_length=1)
    filename: str | None = pydantic.Field(default=None, min_length=1, max_length=MAX_FILENAME_CHARS)
    content_base64: str | None = pydantic.Field(default=None, min_length=1)
    url: str = pydantic.Field(default="", max_length=MAX_URL_CHARS)
    document_id: str | None = pydantic.Field(default=None, pattern=ID)

    @pydantic.model_validator(mode="after")
    def one_content(self) -> Self:
        if (self.text is None) == (self.content_base64 is None):
            raise ValueError("give either text, or filename and content_base64")
        if self.content_base64 is not None and self.filename is None:
            raise ValueError("content_base64 needs a filename (its extension names the format)")
        return self


class SearchBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    query: str = pydantic.Field(min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"\S")
    k: int = pydantic.Field(default=5, ge=1, le=50)


def document_json(document: knowledge_pb2.Document) -> dict[str, object]:
    body: dict[str, object] = {
        "document_id": document.document_id, "title": document.title, "url": document.url,
        "filename": document.filename, "format": document.format, "status": document.status,
        "version": document.version, "serving_version": document.serving_version, "chunks": document.chunks,
        "bytes": document.bytes, "updated_at": document.updated_at}
    if document.error:
        body["error"] = document.error
    return body


def knowledge_error(error: grpc.aio.AioRpcError) -> ApiError:
    mapped = _ERRORS.get(error.code())
    if mapped is None:
        return api_error_from_grpc(error, "knowledge")
    status, code = mapped
    return ApiError(code, error.details() or code, status)


def too_large(limit: int) -> ApiError:
    return ApiError("body_too_large", f"the document is larger than {limit} bytes (KEFU_KB_MAX_DOCUMENT_BYTES)", 413)


async def _call(request: web.Request, method: str, message: Any, timeout_s: float | None = None) -> Any:
    stub = request.app[keys.CLIENTS].knowledge
    try:
        return await getattr(stub, method)(
            message, timeout=timeout_s or request.app[keys.SETTINGS].rpc_timeout_s,
            metadata=request_metadata(request[keys.REQUEST_ID]))
    except grpc.aio.AioRpcError as error:
        raise knowledge_error(error) from None


async def _read_field(part: BodyPartReader, name: str) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        data.extend(chunk)
        if len(data) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"{name}: at most {MAX_FIELD_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name}: not UTF-8 text") from None


async def _multipart(request: web.Request, limit: int) -> knowledge_pb2.PutDocumentRequest:
    """A `file` part plus optional title, url and document_id fields; the file is read up to `limit`."""
    put = knowledge_pb2.PutDocumentRequest()
    seen_file = False
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart bodies are not accepted")
        name = part.name or ""
        if name == "file":
            if seen_file:
                raise InvalidRequest("file: send one file per request")
            seen_file = True
            put.filename = (part.filename or "")[:MAX_FILENAME_CHARS]
            put.content_type = part.headers.get("Content-Type", "")
            data = bytearray()
            while chunk := await part.read_chunk(256 * 1024):
                data.extend(chunk)
                if len(data) > limit:
                    raise too_large(limit)
            put.content = bytes(data)
        elif name in ("title", "url", "document_id"):
            setattr(put, name, await _read_field(part, name))
        else:
            raise InvalidRequest(f"{name or 'a part without a name'}: unexpected field (file, title, url, "
                                 "document_id)")
    if not seen_file:
        raise InvalidRequest("file: missing (send the document in a part named file)")
    if put.document_id and not ID_PATTERN.fullmatch(put.document_id):
        raise InvalidRequest("document_id: 1-64 letters, digits, '_' or '-'")
    if len(put.title) > MAX_TITLE_CHARS or len(put.url) > MAX_URL_CHARS:
        raise InvalidRequest(f"title: at most {MAX_TITLE_CHARS} characters; url: at most {MAX_URL_CHARS}")
    return put


async def _json_upload(request: web.Request, limit: int) -> knowledge_pb2.PutDocumentRequest:
    # The body may be larger than the document: base64 grows a file by 4/3, and JSON's \uXXXX escapes
    # (json.dumps' default) double Chinese text.
    try:
        body = await read_json_body(request, DocumentBody, limit=2 * limit + ENVELOPE_BYTES)
    except BodyTooLarge:
        raise too_large(limit) from None
    put = knowledge_pb2.PutDocumentRequest(title=body.title, url=body.url, document_id=body.document_id or "")
    if body.text is not None:
        put.content = body.text.encode("utf-8")
        put.content_type = "text/markdown"
    else:
        assert body.content_base64 is not None and body.filename is not None
        if len(body.content_base64) > (limit + 2) // 3 * 4 + 4:
            raise too_large(limit)
        try:
            put.content = base64.b64decode(body.content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("content_base64: not base64") from None
        put.filename = body.filename
    return put


async def put_document(request: web.Request) -> web.Response:
    limit = request.app[keys.SETTINGS].kb_max_document_bytes
    if request.content_type == "multipart/form-data":
        if request.content_length is not None and request.content_length > limit + ENVELOPE_BYTES:
            raise too_large(limit)
        put = await _multipart(request, limit)
    elif request.content_type == "application/json" or not request.headers.get("Content-Type"):
        put = await _json_upload(request, limit)
    else:
        raise ApiError("unsupported_media_type", "send application/json or multipart/form-data", 415)
    if len(put.content) > limit:
        raise too_large(limit)
    put.tenant = request[keys.REQUEST_PRINCIPAL].tenant
    stored = await _call(request, "PutDocument", put, UPLOAD_TIMEOUT_S)
    return json_response({"document_id": stored.document_id, "version": stored.version, "status": stored.status},
                         status=202)


async def list_documents(request: web.Request) -> web.Response:
    raw_limit = request.query.get("limit", "100")
    try:
        limit = int(raw_limit)
    except ValueError:
        raise InvalidRequest("limit: an integer 1..1000") from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit: an integer 1..1000")
    cursor = request.query.get("cursor", "")
    if len(cursor) > 200:
        raise InvalidRequest("cursor: not a cursor this API gave out")
    page = await _call(request, "ListDocuments", knowledge_pb2.ListDocumentsRequest(
        tenant=request[keys.REQUEST_PRINCIPAL].tenant, limit=limit, cursor=cursor))
    return json_response({"documents": [document_json(d) for d in page.documents],
                          "next_cursor": page.next_cursor or None})


def _document_id(request: web.Request) -> str:
    document_id = request.match_info["document_id"]
    if not ID_PATTERN.fullmatch(document_id):
        raise ApiError("not_found", "no such document", 404)  # never used in a key
    return document_id


async def get_document(request: web.Request) -> web.Response:
    document = await _call(request, "GetDocument", knowledge_pb2.GetDocumentRequest(
        tenant=request[keys.REQUEST_PRINCIPAL].tenant, document_id=_document_id(request)))
    return json_response(document_json(document))


async def delete_document(request: web.Request) -> web.Response:
    await _call(request, "DeleteDocument", knowledge_pb2.DeleteDocumentRequest(
        tenant=request[keys.REQUEST_PRINCIPAL].tenant, document_id=_document_id(request)))
    return web.Response(status=204)


async def search(request: web.Request) -> web.Response:
    body = await read_json_body(request, SearchBody)
    found = await _call(request, "Search", knowledge_pb2.SearchRequest(
        tenant=request[keys.REQUEST_PRINCIPAL].tenant, query=body.query, k=body.k))
    return json_response({"results": [
        {"document_id": r.document_id, "title": r.title, "url": r.url, "chunk_id": r.chunk_id, "text": r.text,
         "score": round(r.score, 4)} for r in found.results]})
