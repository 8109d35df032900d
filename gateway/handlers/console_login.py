"""POST /v1/console/login: an agent token for the console from a username and password.

Accounts are made with the CLI: `python -m gateway.accounts add --tenant T --username U [--name N]
[--role agent|admin]` (see gateway/accounts.py).
"""

from __future__ import annotations

import pydantic
from aiohttp import web

from gateway import keys
from gateway.bodies import read_json_body
from gateway.directory.agents import MAX_PASSWORD_CHARS, MAX_USERNAME_CHARS
from gateway.errors import ApiError
from gateway.handlers.widget_token import (
    CONSOLE_LOGIN,
    NO_STORE,
    TENANT_PATTERN,
    require_hs256,
    sign_token,
    take_address_token,
)
from gateway.responses import json_response


class LoginBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    tenant: str = pydantic.Field(min_length=1, max_length=64, pattern=TENANT_PATTERN)
    username: str = pydantic.Field(min_length=1, max_length=MAX_USERNAME_CHARS)
    password: str = pydantic.Field(min_length=1, max_length=MAX_PASSWORD_CHARS)


async def console_login(request: web.Request) -> web.Response:
    take_address_token(request, CONSOLE_LOGIN)
    body = await read_json_body(request, LoginBody)
    settings = request.app[keys.SETTINGS]
    require_hs256(settings)
    account = await request.app[keys.DIRECTORY].agents.authenticate(body.tenant, body.username, body.password)
    if account is None:
        # One answer for an unknown tenant or user, a wrong password and a disabled account.
        raise ApiError("invalid_credentials", "wrong tenant, username or password", 401)
    token = sign_token(settings, tenant=body.tenant, subject=account.username, role=account.role,
                       ttl_s=settings.console_token_ttl_s, name=account.display_name)
    return json_response({"token": token, "expires_in": settings.console_token_ttl_s, "agent": {
        "id": account.username, "name": account.display_name, "role": account.role}}, headers=NO_STORE)
