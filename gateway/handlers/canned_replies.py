"""GET/POST /v1/canned-replies and DELETE /v1/canned-replies/{id}: the tenant's canned replies (staff)."""

from __future__ import annotations

import pydantic
from aiohttp import web

from gateway import keys
from gateway.bodies import read_json_body
from gateway.directory.buckets import ID_PATTERN
from gateway.directory.canned import MAX_QUERY_CHARS, MAX_SHORTCUT_CHARS, MAX_TEXT_CHARS, MAX_TITLE_CHARS
from gateway.errors import ApiError, InvalidRequest
from gateway.responses import json_response

NOT_BLANK = r"\S"
SHORTCUT = r"^[^\s]*$"


class CannedReplyBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    title: str = pydantic.Field(min_length=1, max_length=MAX_TITLE_CHARS, pattern=NOT_BLANK)
    text: str = pydantic.Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NOT_BLANK)
    shortcut: str = pydantic.Field(default="", max_length=MAX_SHORTCUT_CHARS, pattern=SHORTCUT)
    """Typed after "/" in the console; no whitespace; "" for none."""


async def list_canned_replies(request: web.Request) -> web.Response:
    query = request.query.get("q", "")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"q: at most {MAX_QUERY_CHARS} characters")
    principal = request[keys.REQUEST_PRINCIPAL]
    replies = await request.app[keys.DIRECTORY].canned.list(principal.tenant, query.strip())
    return json_response({"canned_replies": [reply.to_json() for reply in replies]})


async def create_canned_reply(request: web.Request) -> web.Response:
    body = await read_json_body(request, CannedReplyBody)
    principal = request[keys.REQUEST_PRINCIPAL]
    reply = await request.app[keys.DIRECTORY].canned.add(
        principal.tenant, title=body.title.strip(), text=body.text.strip(), shortcut=body.shortcut,
        created_by=principal.subject)
    return json_response(reply.to_json(), status=201)


async def delete_canned_reply(request: web.Request) -> web.Response:
    reply_id = request.match_info["reply_id"]
    principal = request[keys.REQUEST_PRINCIPAL]
    # A malformed id is as absent as an unknown one (and is never used in a KV key).
    if not ID_PATTERN.fullmatch(reply_id) or not await request.app[keys.DIRECTORY].canned.delete(
            principal.tenant, reply_id):
        raise ApiError("not_found", "no such canned reply", 404)
    return web.Response(status=204)
