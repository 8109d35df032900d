"""GET /v1/tenant/settings (staff) and PUT /v1/tenant/settings (admins): the tenant's live-chat texts
and assistant settings."""

from __future__ import annotations

from typing import Literal

import grpc
import pydantic
from aiohttp import web

from gateway import keys
from gateway.auth import require_role
from gateway.bodies import read_json_body
from gateway.clients import request_metadata
from gateway.directory.tenants import (
    DEFAULT_OFFLINE,
    DEFAULT_WELCOME,
    MAX_ASSISTANT_NAME_CHARS,
    MAX_SYSTEM_PROMPT_CHARS,
    MAX_TEXT_CHARS,
    TenantSettings,
)
from gateway.errors import InvalidRequest, api_error_from_grpc
from gateway.responses import json_response
from kefu.llm.v1 import llm_pb2

ADMIN = frozenset({"admin"})
NOT_BLANK = r"\S"
MAX_ROUTE_CHARS = 64


class TenantSettingsBody(pydantic.BaseModel):
    """PUT replaces the whole settings: a field left out goes back to its default."""

    model_config = pydantic.ConfigDict(extra="forbid")
    welcome: str = pydantic.Field(default=DEFAULT_WELCOME, min_length=1, max_length=MAX_TEXT_CHARS,
                                  pattern=NOT_BLANK)
    offline: str = pydantic.Field(default=DEFAULT_OFFLINE, min_length=1, max_length=MAX_TEXT_CHARS,
                                  pattern=NOT_BLANK)
    leave_message: str = pydantic.Field(default=DEFAULT_OFFLINE, min_length=1, max_length=MAX_TEXT_CHARS,
                                        pattern=NOT_BLANK)
    system_prompt: str = pydantic.Field(default="", max_length=MAX_SYSTEM_PROMPT_CHARS)
    assistant_name: str = pydantic.Field(default="", max_length=MAX_ASSISTANT_NAME_CHARS)
    route: str = pydantic.Field(default="", max_length=MAX_ROUTE_CHARS)
    grounding: Literal["strict", "open"] = "strict"


async def get_tenant_settings(request: web.Request) -> web.Response:
    settings = await request.app[keys.TENANT_SETTINGS].load(request[keys.REQUEST_PRINCIPAL].tenant)
    return json_response(settings.to_json())


async def put_tenant_settings(request: web.Request) -> web.Response:
    principal = request[keys.REQUEST_PRINCIPAL]
    require_role(principal, ADMIN)  # GET is for all staff: the route table holds one role set per path
    body = await read_json_body(request, TenantSettingsBody)
    texts = {name: text.strip() for name, text in body.model_dump().items()}
    if texts["route"]:
        await _check_route(request, texts["route"])
    stored = await request.app[keys.TENANT_SETTINGS].put(principal.tenant, TenantSettings(**texts))
    return json_response(stored.to_json())


async def _check_route(request: web.Request, route: str) -> None:
    """The route must be one the worker serves now (GET /v1/models)."""
    try:
        reply = await request.app[keys.CLIENTS].llm.ListModels(
            llm_pb2.ListModelsRequest(), timeout=request.app[keys.SETTINGS].rpc_timeout_s,
            metadata=request_metadata(request[keys.REQUEST_ID]))
    except grpc.aio.AioRpcError as error:
        raise api_error_from_grpc(error, "llm") from None
    names = sorted(model.name for model in reply.models)
    if route not in names:
        raise InvalidRequest(f"route: no model {route!r}; the models are {', '.join(names)}")
