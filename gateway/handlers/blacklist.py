"""GET/POST /v1/blacklist and DELETE /v1/blacklist/{id}: visitors and addresses a tenant refuses (staff)."""

from __future__ import annotations

from typing import Self

import pydantic
from aiohttp import web

from gateway import keys
from gateway.addresses import parse_network
from gateway.bodies import read_json_body
from gateway.directory.blacklist import MAX_ADDRESS_CHARS, MAX_REASON_CHARS, MAX_VISITOR_ID_CHARS
from gateway.directory.buckets import ID_PATTERN
from gateway.errors import ApiError, InvalidRequest
from gateway.responses import json_response

VISITOR_ID = r"^[^\s\x00-\x1f\x7f]*$"
ADDRESS = r"^[0-9A-Fa-f:./]*$"


class BlacklistBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    visitor_id: str = pydantic.Field(default="", max_length=MAX_VISITOR_ID_CHARS, pattern=VISITOR_ID)
    address: str = pydantic.Field(default="", max_length=MAX_ADDRESS_CHARS, pattern=ADDRESS)
    """An IPv4 or IPv6 address, or a network in CIDR notation."""
    reason: str = pydantic.Field(default="", max_length=MAX_REASON_CHARS)

    @pydantic.model_validator(mode="after")
    def exactly_one_target(self) -> Self:
        if bool(self.visitor_id) == bool(self.address):
            raise ValueError("give exactly one of visitor_id and address")
        return self


async def list_blacklist(request: web.Request) -> web.Response:
    entries = await request.app[keys.DIRECTORY].blacklist.list(request[keys.REQUEST_PRINCIPAL].tenant)
    return json_response({"entries": [entry.to_json() for entry in entries]})


async def create_blacklist_entry(request: web.Request) -> web.Response:
    body = await read_json_body(request, BlacklistBody)
    if body.address:
        try:
            parse_network(body.address)
        except ValueError:
            raise InvalidRequest("address: must be an IP address or a network in CIDR notation") from None
    principal = request[keys.REQUEST_PRINCIPAL]
    entry = await request.app[keys.DIRECTORY].blacklist.add(
        principal.tenant, visitor_id=body.visitor_id, address=body.address, reason=body.reason.strip(),
        created_by=principal.subject)
    return json_response(entry.to_json(), status=201)


async def delete_blacklist_entry(request: web.Request) -> web.Response:
    entry_id = request.match_info["entry_id"]
    principal = request[keys.REQUEST_PRINCIPAL]
    if not ID_PATTERN.fullmatch(entry_id) or not await request.app[keys.DIRECTORY].blacklist.delete(
            principal.tenant, entry_id):
        raise ApiError("not_found", "no such blacklist entry", 404)
    return web.Response(status=204)
