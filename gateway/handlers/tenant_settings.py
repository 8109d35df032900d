"""GET /v1/tenant/settings (staff) and PUT /v1/tenant/settings (admins): the tenant's live-chat texts."""

from __future__ import annotations

import pydantic
from aiohttp import web

from gateway import keys
from gateway.auth import require_role
from gateway.bodies import read_json_body
from gateway.directory.tenants import DEFAULT_OFFLINE, DEFAULT_WELCOME, MAX_TEXT_CHARS, TenantSettings
from gateway.responses import json_response

ADMIN = frozenset({"admin"})
NOT_BLANK = r"\S"


class TenantSettingsBody(pydantic.BaseModel):
    """PUT replaces the whole settings: a field left out goes back to its default."""

    model_config = pydantic.ConfigDict(extra="forbid")
    welcome: str = pydantic.Field(default=DEFAULT_WELCOME, min_length=1, max_length=MAX_TEXT_CHARS,
                                  pattern=NOT_BLANK)
    offline: str = pydantic.Field(default=DEFAULT_OFFLINE, min_length=1, max_length=MAX_TEXT_CHARS,
                                  pattern=NOT_BLANK)
    leave_message: str = pydantic.Field(default=DEFAULT_OFFLINE, min_length=1, max_length=MAX_TEXT_CHARS,
                                        pattern=NOT_BLANK)


async def get_tenant_settings(request: web.Request) -> web.Response:
    settings = await request.app[keys.TENANT_SETTINGS].load(request[keys.REQUEST_PRINCIPAL].tenant)
    return json_response(settings.to_json())


async def put_tenant_settings(request: web.Request) -> web.Response:
    principal = request[keys.REQUEST_PRINCIPAL]
    require_role(principal, ADMIN)  # GET is for all staff: the route table holds one role set per path
    body = await read_json_body(request, TenantSettingsBody)
    texts = {name: text.strip() for name, text in body.model_dump().items()}
    stored = await request.app[keys.TENANT_SETTINGS].put(principal.tenant, TenantSettings(**texts))
    return json_response(stored.to_json())
