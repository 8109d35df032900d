"""POST /v1/console/login: an agent token for the console from a username and password.

Every attempt takes a token from the address's bucket (KEFU_WIDGET_TOKEN_RPS / _BURST); it is refused
at once when the failure bucket of its address or of its user name is empty (gateway/login_limits.py),
else it waits for one of the process's few argon2 slots, takes a failure token from both (given back
when it succeeds) and verifies. Any refusal is 429 with Retry-After. Accounts are made with the CLI:
`python -m gateway.accounts add --tenant T --username U [--name N] [--role agent|admin]` (gateway/accounts.py).
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
    address_key,
    client_address,
    require_hs256,
    sign_token,
    take_address_token,
)
from gateway.login_limits import LoginThrottled
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
    limits, outcomes = request.app[keys.LOGIN_LIMITS], request.app[keys.METRICS].console_logins
    address = address_key(client_address(request))
    try:
        limits.check(address, body.tenant, body.username)
        async with limits.slot():
            # Charged before verifying, so parallel guesses count too; given back on success.
            charge = limits.charge(address, body.tenant, body.username)
            account = await request.app[keys.DIRECTORY].agents.authenticate(
                body.tenant, body.username, body.password, executor=limits.executor)
    except LoginThrottled as refused:
        outcomes.labels(refused.outcome).inc()
        raise
    if account is None:
        outcomes.labels("invalid").inc()
        # One answer for an unknown tenant or user, a wrong password and a disabled account.
        raise ApiError("invalid_credentials", "wrong tenant, username or password", 401)
    limits.forgive(charge)
    outcomes.labels("ok").inc()
    token = sign_token(settings, tenant=body.tenant, subject=account.username, role=account.role,
                       ttl_s=settings.console_token_ttl_s, name=account.display_name)
    return json_response({"token": token, "expires_in": settings.console_token_ttl_s, "agent": {
        "id": account.username, "name": account.display_name, "role": account.role}}, headers=NO_STORE)
