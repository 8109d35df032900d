"""Reading request bodies: size, media type, UTF-8 JSON, then a pydantic schema."""

from __future__ import annotations

import json
from typing import TypeVar

import pydantic
from aiohttp import web

from gateway import keys
from gateway.errors import ApiError, BodyTooLarge, InvalidJson, InvalidRequest

Model = TypeVar("Model", bound=pydantic.BaseModel)


async def read_json_body(request: web.Request, model: type[Model], *, limit: int | None = None) -> Model:
    """`limit`: a larger body limit than KEFU_MAX_BODY_BYTES for this route (document uploads)."""
    limit = limit or request.app[keys.SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(request.content_length, limit)
    content_type = request.headers.get("Content-Type", "")
    if content_type and request.content_type != "application/json" and not request.content_type.endswith("+json"):
        raise ApiError("unsupported_media_type", "send the body as application/json", 415)
    if limit != request.client_max_size:
        request = request.clone(client_max_size=limit)
    try:
        raw = await request.read()  # aiohttp refuses bodies over client_max_size with 413
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(None, limit) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidJson("not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise InvalidJson(f"{error.msg} at line {error.lineno} column {error.colno}") from None
    except (ValueError, RecursionError):
        # Integers of thousands of digits, arrays nested thousands deep: not JSON we accept.
        raise InvalidJson("numbers too long or nesting too deep") from None
    try:
        # "\ud800" escapes decode to lone surrogates, which no UTF-8 (or protobuf string) can hold.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("strings must be valid Unicode text (no lone surrogates)") from None
    try:
        return model.model_validate(data, strict=True)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}") from None
